"""NeMo-Gym resource servers over HTTP: ``NemoGymEnv`` plays the rows of a NeMo-Gym dataset against a
running resource server, with the standard library's HTTP client only::

    gymnasium.register("my/Synonyms-v0", entry_point="hybrid_rl.envs.adapters:NemoGymEnv",
                       kwargs={"url": "http://127.0.0.1:8000", "rows": "data/synonyms.jsonl"}, max_episode_steps=8)

An episode, in NeMo-Gym's shapes (docs/ENVIRONMENTS.md):

1. ``reset``: the seed picks a row (``{"responses_create_params": {"input": ..., "tools": [...]}, ...}``); a new
   session (cookies, as NeMo-Gym's session middleware sets them) is opened with ``POST /seed_session`` and the
   row. The first observation is the row's user input; its system/developer input and the tool list make the
   system prompt.
2. a tool call in hybrid-rl's format (``envs.tools``) is ``POST /<tool name>`` with the arguments as the JSON
   body; the JSON answer is the next observation (role ``tool``). A malformed call, a tool the row does not
   list, or a 4xx answer (the server refused the arguments) is an invalid action whose observation says why.
3. an answer without a tool call ends the episode: ``POST /verify`` with the row and ``response.output``, the
   episode as Responses API items (``function_call``, ``function_call_output``, a final ``message``); its
   ``reward`` is the reward, or the sum of ``reward_components`` when there is no ``reward``. Components
   that do not sum to the reward are reported with the difference as ``rest``. Success: a positive reward.

A server that is down, answers 5xx or malformed JSON, or outlives ``timeout_s`` raises ``NemoGymError``
with what failed and what to check; the rollout engine turns it into an ``env_error`` episode, never a
crash (and its own ``rollout.env_timeout_s`` into ``timeout``).

Departures from NeMo-Gym: its agent server calls the model through the Responses API; here the rollout
engine is the agent and the model writes tool calls as text, so the response (with the fields NeMo-Gym
validates: ids, ``created_at``, ``model``, the row's tools) carries no reasoning items or token usage;
``/aggregate_metrics`` and ``/close_session`` are not called; every seed split draws from the same rows (give
the eval its own file under another id).

``NemoGymnasiumEnv`` plays a NeMo-Gym ``GymnasiumServer`` (what its ``gymnasium_agent`` drives), whose episodes
are gymnasium's: ``POST /reset`` with the row opens the session and answers ``{"observation", "info"}``, and
each turn is ``POST /step`` with the row and the model's message as ``response.output``, answered with
``{"observation", "reward", "terminated", "truncated", "info"}``. The first observation is the row's user
input followed by what ``/reset`` answered; the server parses the model's text itself (no tool list).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from typing import Any

from hybrid_rl.envs.adapters.common import ToolCallingEnv, load_rows, split_prompt, system_prompt
from hybrid_rl.envs.core import TextEnv
from hybrid_rl.envs.tools import ToolCall

__all__ = ["NemoGymEnv", "NemoGymnasiumEnv", "NemoGymError", "verified_reward"]

MAX_TOOL_OUTPUT_CHARS = 1000  # as envs.call_tool: a tool answer is an observation, not a document


class NemoGymError(RuntimeError):
    """The resource server failed (down, 5xx, malformed JSON, too slow): the episode is ``env_error``."""


class NemoGymRefused(NemoGymError):
    """A 4xx answer: the server refused the request (for a tool call, the model's arguments)."""

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status, self.body = status, body


class _ServerHTTP:
    """A NeMo-Gym server's URL, rows and session (cookies, as its session middleware sets them), and ``_post``."""

    def _connect(self, url: str, rows: Any, timeout_s: float, what: str) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{what} url={url!r}: give the resource server's base URL, e.g. 'http://127.0.0.1:8000'.")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.rows = load_rows(rows, f"{what} rows")
        bad = [i for i, row in enumerate(self.rows) if "input" not in (row.get("responses_create_params") or {})]
        if not self.rows or bad:
            raise ValueError(f"{what} rows: {'no rows' if not self.rows else f'rows {bad[:5]} have no responses_create_params.input'}; "
                             f"each row is a NeMo-Gym task, {{\"responses_create_params\": {{\"input\": [...], \"tools\": [...]}}, ...}}.")
        self.row: dict = {}
        self.responses = 0  # Response ids sent
        self.opener = urllib.request.build_opener()

    def _response(self, output: list[dict]) -> dict:
        """``output`` as the Responses API ``Response`` NeMo-Gym's servers validate (``NeMoGymResponse``): its
        required fields, from the row's ``responses_create_params`` where it sets them."""
        params = self.row.get("responses_create_params") or {}
        self.responses += 1
        return {"id": f"resp_{self.responses}", "object": "response", "created_at": int(time.time()),
                "model": params.get("model") or "hybrid-rl-policy", "status": "completed", "output": output,
                "parallel_tool_calls": bool(params.get("parallel_tool_calls", False)),
                "tool_choice": params.get("tool_choice", "auto"), "tools": list(params.get("tools") or [])}

    def _new_session(self, seed_rng) -> dict:
        """Pick this episode's row with ``seed_rng`` and start a new cookie session; the row."""
        self.row = self.rows[int(seed_rng.integers(len(self.rows)))]
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        return self.row

    def _post(self, path: str, body: Any) -> Any:
        """POST ``body`` as JSON, return the JSON answer; raise ``NemoGymError`` naming what failed."""
        where = f"POST {self.url}{path}"
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            if 400 <= err.code < 500:
                raise NemoGymRefused(f"{where} answered HTTP {err.code}: {detail}", err.code, detail) from None
            raise NemoGymError(f"{where} answered HTTP {err.code}: {detail}; the resource server failed, see its log.") from None
        except (urllib.error.URLError, OSError) as err:  # refused, unreachable, timed out
            reason = getattr(err, "reason", err)
            raise NemoGymError(f"{where} failed: {reason} (timeout {self.timeout_s:g} s); is the resource server running "
                               f"at {self.url}? Start it, or fix {type(self).__name__} url.") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise NemoGymError(f"{where} answered {raw[:80]!r}, which is not JSON; a resource server answers JSON.") from None



class NemoGymEnv(_ServerHTTP, ToolCallingEnv):
    """A NeMo-Gym resource server's task rows, played over HTTP."""

    invalid_penalty = 0.0  # the reward is the server's (/verify)

    def __init__(self, url: str, rows: Any, timeout_s: float = 20.0, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        self._connect(url, rows, timeout_s, "NemoGymEnv")
        self.output: list[dict] = []  # the episode as Responses API output items, for /verify

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._new_session(self.np_random)
        self.output = []
        self._post("/seed_session", self.row)
        params = self.row["responses_create_params"]
        self.tools = [{"name": t["name"], "description": t.get("description", ""), "parameters": t.get("parameters", {})}
                      for t in params.get("tools", []) if isinstance(t, dict) and "name" in t]
        system, prompt = split_prompt(params["input"])
        self.system_prompt = system_prompt(system, self.tools)
        return self.observe(prompt)

    def run_tool(self, call: ToolCall):
        names = [t["name"] for t in self.tools]
        if call.name not in names:
            return self.result(f"error: unknown tool {call.name!r}; available tools: {', '.join(names) or 'none'}.", {},
                               invalid=True, role="tool")
        call_id = f"call_{len(self.output)}"
        self.output.append({"id": f"fc_{len(self.output)}", "type": "function_call", "name": call.name, "status": "completed",
                            "arguments": json.dumps(call.arguments), "call_id": call_id})
        try:
            observation, invalid = json.dumps(self._post(f"/{call.name}", call.arguments)), False
        except NemoGymRefused as err:
            observation, invalid = f"error: {call.name} refused the call (HTTP {err.status}): {err.body}", True
        self.output.append({"type": "function_call_output", "call_id": call_id, "output": observation})
        return self.result(observation[:MAX_TOOL_OUTPUT_CHARS], {}, invalid=invalid, role="tool")

    def final_answer(self, text: str):
        self.output.append(output_message(text, len(self.output)))
        reward, components = verified_reward(self._post("/verify", {**self.row, "response": self._response(self.output)}))
        return self.result("done", components, terminated=True, success=reward > 0)


class NemoGymnasiumEnv(_ServerHTTP, TextEnv):
    """A NeMo-Gym ``GymnasiumServer``'s task rows, played over HTTP: ``/reset``, then ``/step`` per turn."""

    def __init__(self, url: str, rows: Any, timeout_s: float = 20.0, render_mode: str | None = None):
        super().__init__(render_mode=render_mode)
        self._connect(url, rows, timeout_s, "NemoGymnasiumEnv")
        self.turn = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        row = self._new_session(self.np_random)
        self.turn = 0
        answer = self._post("/reset", row)
        if not isinstance(answer, dict) or not isinstance(answer.get("observation", ""), (str, type(None))) \
                or not isinstance(answer.get("info") or {}, dict):
            raise NemoGymError(f"/reset answered {str(answer)[:120]}; expected {{\"observation\": str or null, \"info\": {{...}}}}.")
        system, prompt = split_prompt(row["responses_create_params"]["input"])
        self.system_prompt = system or None
        observation = "\n".join(text for text in (prompt, answer.get("observation")) if text)
        if not observation:
            raise NemoGymError("the row's input has no user message and /reset answered no observation: nothing to show "
                               "the model; give the rows a user input or answer one from /reset.")
        self.last_observation = observation
        return observation, {**(answer.get("info") or {}), "role": "user"}

    def step_text(self, text: str):
        answer = self._post("/step", {**self.row, "response": self._response([output_message(text, self.turn)])})
        self.turn += 1
        expected = ('; expected {"observation": str or null, "reward": number, "terminated": bool, "truncated": bool, '
                    '"info": {...}}.')
        if not isinstance(answer, dict):
            raise NemoGymError(f"/step answered {str(answer)[:120]}{expected}")
        observation, reward = answer.get("observation") or "", answer.get("reward", 0.0)
        terminated, truncated = answer.get("terminated", False), answer.get("truncated", False)
        info = answer.get("info") or {}
        if not isinstance(observation, str) or isinstance(reward, bool) or not isinstance(reward, (int, float)) \
                or not math.isfinite(reward) or not isinstance(terminated, bool) or not isinstance(truncated, bool) \
                or not isinstance(info, dict):
            raise NemoGymError(f"/step answered observation {str(observation)[:40]!r}, reward {reward!r}, terminated "
                               f"{terminated!r}, truncated {truncated!r}, info {str(info)[:40]}{expected}")
        self.last_observation = observation
        return observation, float(reward), terminated, truncated, {**info, "role": "user"}


def output_message(text: str, index: int) -> dict:
    """The model's text as a Responses API output message (``ResponseOutputMessage``, with its required fields)."""
    return {"id": f"msg_{index}", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def verified_reward(answer: Any) -> tuple[float, dict[str, float]]:
    """``/verify``'s answer -> (reward, components summing to it)."""
    if not isinstance(answer, dict) or not ("reward" in answer or "reward_components" in answer):
        raise NemoGymError(f"/verify answered {str(answer)[:120]}; expected a JSON object with 'reward' (a number) "
                           f"or 'reward_components' (name -> number).")
    try:
        parts = {str(k): float(v) for k, v in (answer.get("reward_components") or {}).items()}
        reward = float(answer["reward"]) if "reward" in answer else sum(parts.values())
    except (TypeError, ValueError, AttributeError):
        raise NemoGymError(f"/verify answered reward {answer.get('reward')!r}, reward_components "
                           f"{answer.get('reward_components')!r}; expected numbers.") from None
    if not all(math.isfinite(x) for x in (reward, *parts.values())):
        raise NemoGymError(f"/verify answered reward {answer.get('reward')!r}, reward_components "
                           f"{answer.get('reward_components')!r}; expected finite numbers (no NaN or infinity).")
    if not parts:
        return reward, {"reward": reward}
    rest = reward - sum(parts.values())
    return reward, parts if abs(rest) < 1e-9 else {**parts, "rest": rest}
