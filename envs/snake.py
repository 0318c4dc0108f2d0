"""Snake on a small board: eat the apples without hitting a wall or your own body."""

from __future__ import annotations

from collections import deque

from hybrid_rl.envs.core import TextEnv, first_word

__all__ = ["Snake"]

MOVES = ("left", "down", "right", "up")
STEPS = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}


class Snake(TextEnv):
    """Steer a snake to its apples, one after another, on a square board (``apples`` of them, ``size`` x ``size``).

    Observation: the board, one row per line: ``@`` your head, ``o`` your body, ``*`` the apple, ``.`` free;
    at the start after "Eat 3 apples (*). Do not hit a wall or your body (o). Moves: left down right up.",
    and "Apple eaten, 2 to go." above the board after a bite.
    Action: a move, the first of ``left down right up`` in the text; text without one is invalid (the snake
    stays). The snake grows by one behind each apple; a move off the board or into the body ends the episode
    (the tail's cell is free, it moves away, except when the head eats an apple). Moving straight back is a
    move into the neck. A new board per seed: the snake (``length`` cells, straight) and the first apple at
    random; each next apple on a random free cell.
    Reward: ``success`` 1.0 for the last apple, ``apple`` ``apple_reward`` for each other one, ``turn``
    -``turn_penalty`` per move, ``invalid`` -0.05.
    Expert: a shortest path to the apple that leaves the head a way to its tail afterwards, else the first
    move that keeps the tail reachable (it follows its tail until a safe path opens). Heuristic
    (``heuristic_action``): head for the apple, the first move in ``left down right up`` order that brings the
    head closer (Manhattan distance) without leaving the board; it does not look at its body, so it bites
    itself whenever the body lies between the head and the apple.
    """

    instant_steps = True  # a pure game: the engine steps it on its own thread

    def __init__(self, size: int = 5, apples: int = 3, length: int = 3, apple_reward: float = 0.1,
                 turn_penalty: float = 0.01, render_mode: str | None = None, expert_noise: float = 0.0):
        super().__init__(render_mode=render_mode, expert_noise=expert_noise)
        if size < 3:
            raise ValueError(f"size={size}: the board needs at least 3x3 cells.")
        if not 1 <= length <= size:
            raise ValueError(f"length={length}: the snake starts straight on the board, so 1 <= length <= size={size}.")
        if not 1 <= apples <= size * size - length - 1:
            raise ValueError(f"apples={apples}: need 1 <= apples <= {size * size - length - 1} (the free cells of a "
                             f"{size}x{size} board after a snake of {length}, one left to move into).")
        self.size, self.apples, self.start_length = size, apples, length
        self.apple_reward, self.turn_penalty = apple_reward, turn_penalty
        self.body: deque[tuple[int, int]] = deque([(0, 0)])
        self.apple = (0, 1)
        self.eaten = 0

    # ------------------------------------------------------------------ the game

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        n, length = self.size, self.start_length
        while True:  # a straight snake pointing away from its tail, all of it on the board
            head = (int(self.np_random.integers(n)), int(self.np_random.integers(n)))
            dr, dc = STEPS[MOVES[int(self.np_random.integers(4))]]
            cells = [(head[0] - i * dr, head[1] - i * dc) for i in range(length)]
            if all(self._on_board(c) for c in cells):
                break
        self.body = deque(cells)
        self.eaten = 0
        self._place_apple()
        return self.observe(f"Eat {self.apples} apples (*). Do not hit a wall or your body (o). "
                            f"Moves: {' '.join(MOVES)}.\n{self.board()}")

    def step_text(self, text: str):
        move = first_word(text, {m: i for i, m in enumerate(MOVES)})
        if move is None:
            return self.invalid(f"no move; answer one of {', '.join(MOVES)}.")
        turn = {"turn": -self.turn_penalty}
        head = self._next(self.body[0], MOVES[move])
        if not self._on_board(head):
            return self.result(f"{self.board()}\nYou hit the wall.", turn, terminated=True)
        eats = head == self.apple
        if head in self._obstacles(eats):
            return self.result(f"{self.board()}\nYou bit your body.", turn, terminated=True)
        self.body.appendleft(head)
        if not eats:
            self.body.pop()
            return self.result(self.board(), turn)
        self.eaten += 1
        if self.eaten == self.apples:
            self.apple = None
            return self.result(f"{self.board()}\nYou ate all {self.apples} apples.", {"success": 1.0, **turn},
                               terminated=True, success=True)
        self._place_apple()
        left = self.apples - self.eaten
        return self.result(f"Apple eaten, {left} to go.\n{self.board()}", {"apple": self.apple_reward, **turn})

    def board(self) -> str:
        rows = [["."] * self.size for _ in range(self.size)]
        for r, c in list(self.body)[1:]:
            rows[r][c] = "o"
        if self.apple is not None:
            rows[self.apple[0]][self.apple[1]] = "*"
        rows[self.body[0][0]][self.body[0][1]] = "@"
        return "\n".join("".join(row) for row in rows)

    def _place_apple(self):
        free = [(r, c) for r in range(self.size) for c in range(self.size) if (r, c) not in self.body]
        self.apple = free[int(self.np_random.integers(len(free)))]

    def _on_board(self, cell) -> bool:
        return 0 <= cell[0] < self.size and 0 <= cell[1] < self.size

    @staticmethod
    def _next(cell, move):
        return cell[0] + STEPS[move][0], cell[1] + STEPS[move][1]

    def _obstacles(self, eats: bool) -> set:
        """The cells the head cannot enter next: the body, without the tail's cell unless the snake grows."""
        body = list(self.body)
        return set(body if eats else body[:-1])

    def _safe(self, move: str) -> bool:
        head = self._next(self.body[0], move)
        return self._on_board(head) and head not in self._obstacles(head == self.apple)

    # ------------------------------------------------------------------ teachers

    def expert_action(self, noise: float | None = None) -> str:
        if self.wants_noise(noise):
            return self.random_action()
        path = self._path(self.body, self.apple)
        if path is not None and self._tail_reachable(self._walk(self.body, path)):
            return path[0]
        for move in MOVES:  # no safe way to the apple now: keep a way to the tail open and wait
            if self._safe(move) and self._tail_reachable(self._walk(self.body, [move])):
                return move
        return next((m for m in MOVES if self._safe(m)), MOVES[0])

    def heuristic_action(self, noise: float | None = None) -> str:
        """Myopic "head for the apple", blind to its own body: the first move in ``MOVES`` order that brings
        the head closer to the apple (Manhattan distance) and stays on the board, else the first move that
        stays on the board. It never hits a wall, but when the apple lies behind or beside its body it steers
        into itself (on default boards it eats all the apples on about a third of the seeds)."""
        if self.wants_noise(noise):
            return self.random_action()
        head = self.body[0]

        def distance(cell):
            return abs(cell[0] - self.apple[0]) + abs(cell[1] - self.apple[1])

        on_board = [m for m in MOVES if self._on_board(self._next(head, m))]
        return next((m for m in on_board if distance(self._next(head, m)) < distance(head)), on_board[0])

    def random_action(self) -> str:
        return MOVES[int(self.expert_rng.integers(len(MOVES)))]

    def _path(self, body, target):
        """Shortest list of moves from the head to ``target`` through free cells (the body's cells free up
        as the snake moves: a cell k segments from the tail is free after k moves), or None."""
        body = list(body)
        vacates = {cell: len(body) - i for i, cell in enumerate(body)}  # moves until the cell is free
        start = body[0]
        seen, queue = {start: []}, deque([start])
        while queue:
            cell = queue.popleft()
            moves = seen[cell]
            for move in MOVES:
                nxt = self._next(cell, move)
                if not self._on_board(nxt) or nxt in seen or vacates.get(nxt, 0) > len(moves) + 1:
                    continue
                seen[nxt] = moves + [move]
                if nxt == target:
                    return seen[nxt]
                queue.append(nxt)
        return None

    def _walk(self, body, moves):
        """The body after the moves (growing by one where the head reaches the apple)."""
        body = deque(body)
        for move in moves:
            head = self._next(body[0], move)
            body.appendleft(head)
            if head != self.apple:
                body.pop()
        return body

    def _tail_reachable(self, body) -> bool:
        """Can the head still reach its tail's cell (so it can always follow itself)?"""
        if len(body) < 3:
            return True
        return self._path(list(body)[:-1], body[-1]) is not None
