"""``hybrid-rl envs``: list, check and watch the registered text environments.

    hybrid-rl envs list
    hybrid-rl envs check [ID ...] [--episodes 200]        (no ID: every registered environment)
    hybrid-rl envs expert ID [--policy heuristic] [--episodes 200] [--noise 0.2] [--show 1] [--arg size=8]

An ID may carry arguments, ``'GuessNumber-v0(n=100;turn_penalty=0)'``; they are applied together with any
``--arg`` (a key given both ways with different values is an error).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from hybrid_rl.envs.checker import CHECK_TIMEOUT_S, check
from hybrid_rl.envs.episode import POLICIES, expert_episode, expert_stats
from hybrid_rl.envs.registry import UnknownEnvironmentError, describe, env_ids, max_turns, merge_args, resolve_id, seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,check,expert}")
    sub.add_parser("list", help="registered environments with their turn limit and a one-line description")
    p_check = sub.add_parser("check", help="gymnasium's checker plus ours (determinism, text spaces, bad actions, truncation, expert)")
    p_check.add_argument("env_ids", nargs="*", metavar="ID", help="environment ids (default: all)")
    p_check.add_argument("--episodes", type=int, default=200, help="eval seeds the expert plays (default 200)")
    p_check.add_argument("--timeout", type=float, default=CHECK_TIMEOUT_S,
                         help=f"seconds one check may take (default {CHECK_TIMEOUT_S:g}; 0 = no limit): a hung reset or step fails it")
    _add_env_args(p_check)
    p_expert = sub.add_parser("expert", help="a teacher's success rate (the expert's by default) on eval seeds, and sample transcripts")
    p_expert.add_argument("env_id", metavar="ID")
    p_expert.add_argument("--policy", choices=POLICIES, default="expert",
                          help="the teacher: expert (optimal solver), heuristic (plausible, systematically worse) "
                               "or random (default expert)")
    p_expert.add_argument("--episodes", type=int, default=200, help="episodes to play (default 200)")
    p_expert.add_argument("--split", choices=("train", "val", "eval"), default="eval")
    p_expert.add_argument("--noise", type=float, default=None, help="probability of a random action (default: the env's)")
    p_expert.add_argument("--show", type=int, default=0, help="print this many transcripts")
    _add_env_args(p_expert)


def _add_env_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the environment, e.g. --arg size=8 --arg max_episode_steps=64")


def _env_kwargs(pairs: list[str]) -> dict:
    kwargs = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"hybrid-rl envs: error: --arg {pair!r} is not KEY=VALUE (e.g. --arg size=8).")
        kwargs[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return kwargs


def run(args: argparse.Namespace) -> int:
    try:
        return {"list": _list, "check": _check, "expert": _expert}[args.action](args)
    except UnknownEnvironmentError as err:
        print(f"hybrid-rl envs: error: {err}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as err:  # a bad --arg for the environment's constructor
        print(f"hybrid-rl envs: error: {err}", file=sys.stderr)
        return 2


def _list(args: argparse.Namespace) -> int:
    ids = env_ids()
    width = max((len(i) for i in ids), default=10)
    print(f"{'id':<{width}}  turns  description")
    for env_id in ids:
        print(f"{env_id:<{width}}  {max_turns(env_id) or '-':>5}  {describe(env_id)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    kwargs = _env_kwargs(args.arg)
    failed = []
    ids = args.env_ids or env_ids()
    for env_id in ids:
        merge_args(env_id, kwargs)  # a clash between the id's arguments and --arg fails before any check runs
    for env_id in ids:
        report = check(env_id, episodes=args.episodes, timeout_s=args.timeout, **kwargs)
        print(report.format(), flush=True)
        if not report.passed:
            failed.append(report.env_id)
    if failed:
        print(f"{len(failed)} environment(s) failed: {', '.join(failed)}")
        return 1
    return 0


def _expert(args: argparse.Namespace) -> int:
    base, kwargs = merge_args(args.env_id, _env_kwargs(args.arg))  # the id's arguments, then --arg
    label = resolve_id(base) + args.env_id[len(base):]  # shown with the id's arguments
    env_id = resolve_id(base)
    for seed in seeds(env_id, args.split, args.show):
        episode = expert_episode(env_id, seed, noise=args.noise, policy=args.policy, **kwargs)
        print(f"--- {label} seed {seed}\n{episode.transcript()}")
    stats = expert_stats(env_id, args.episodes, split=args.split, noise=args.noise, policy=args.policy, **kwargs)
    noise = "n/a" if args.policy == "random" else args.noise if args.noise is not None else "default"
    print(f"{label} {args.policy} (noise {noise}) on {stats['episodes']} "
          f"{args.split} seeds: success {stats['success_rate']:.1%}, mean return {stats['mean_return']:.3f}, "
          f"mean turns {stats['mean_turns']:.2f}")
    return 0
