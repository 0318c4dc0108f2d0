"""The application layer: recipes that chain the stages (``hybrid-rl pipeline``: demonstrations -> SFT ->
RL -> eval of both) and the pages written from their runs. The only package that imports more than one
stage; the stages (sft/, rl/) import the foundation (hybrid_rl/), model/, envs/ and rollout/, never each other.
"""
