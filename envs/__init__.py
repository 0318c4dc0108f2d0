"""Text environments for agentic RL: the API, the registry, the built-ins, experts and the checker.

``from hybrid_rl import envs`` registers the built-ins (``hybrid_rl/GuessNumber-v0``, ...) in gymnasium's registry and
loads third-party environments from the entry-point group ``hybrid_rl.envs``. See docs/ENVIRONMENTS.md.
"""

from hybrid_rl.envs.core import (
    CHARSET, MAX_ACTION_CHARS, MAX_OBS_CHARS, TextEnv, episode_success, first_int, first_word, quote, text_space,
)
from hybrid_rl.envs.registry import (
    ENTRY_POINT_GROUP, NAMESPACE, UnknownEnvironmentError, check_env_ids, describe, env_ids, import_env_modules,
    load_plugins, make, max_turns, register_builtins, resolve_id, seeds,
)
from hybrid_rl.envs.tools import ToolCall, ToolCallError, ToolResult, call_tool, format_tool_call, parse_tool_call
from hybrid_rl.envs.episode import POLICIES, Episode, expert_episode, expert_policy, expert_stats, run_episode
from hybrid_rl.envs.checker import CheckReport, check

__all__ = [
    "TextEnv", "text_space", "CHARSET", "MAX_OBS_CHARS", "MAX_ACTION_CHARS", "first_int", "first_word", "quote",
    "episode_success",
    "NAMESPACE", "ENTRY_POINT_GROUP", "UnknownEnvironmentError", "make", "resolve_id", "env_ids", "describe",
    "max_turns", "seeds", "register_builtins", "load_plugins", "import_env_modules", "check_env_ids",
    "ToolCall", "ToolCallError", "ToolResult", "parse_tool_call", "format_tool_call", "call_tool",
    "Episode", "POLICIES", "run_episode", "expert_policy", "expert_episode", "expert_stats", "check", "CheckReport",
]

register_builtins()
load_plugins()
