"""ReverseWord: spell a short word backwards (three tries)."""

from hybrid_rl.envs import TextEnv

WORDS = ("cat", "dog", "sun", "map", "pen", "cup", "box", "leaf", "star", "moon", "frog", "lamp")


class ReverseWord(TextEnv):
    """Spell a short word backwards; three tries, each try costs a little."""

    instant_steps = True  # reset and step are pure string work: the rollout engine calls them on its own thread

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.word = WORDS[int(self.np_random.integers(len(WORDS)))]
        return self.observe(f"Reverse: {self.word}")

    def step_text(self, text):
        answer = text.strip().lower()
        if not answer.isalpha():
            return self.invalid("answer with the reversed word, letters only.")
        if answer == self.word[::-1]:
            return self.result("correct", {"success": 1.0, "turn": -0.05}, terminated=True, success=True)
        return self.result("wrong, try again", {"turn": -0.05})

    def expert_action(self, noise=None):
        return self.word if self.wants_noise(noise) else self.word[::-1]
