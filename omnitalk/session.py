"""Conversations that share one model: multi-turn context in a slot-pool KV cache, decode steps of all
sessions batched together (continuous batching), cancellation and truncation to what was heard.

    sched = Scheduler(model, max_sessions=8); sched.start()
    conv = sched.open()
    for chunk in conv.respond(audio=samples_16k):      # StreamChunk(int16 24 kHz PCM, text delta)
        ...
    conv.close()

How turns are joined (the released model was trained single-turn, so this is our choice): every row of
a conversation's cache holds its turns back to back — each turn's prompt exactly as a single-turn
request builds it, then the answer columns as they were fed, then one closing column (text `_eot`,
audio `_eoa` on the speaking row, `_pad_a` otherwise). A new turn's prompt continues at the next
position, so earlier turns stay in context and their keys/values are reused, not recomputed. When a
turn would not fit in `max_len` positions, the oldest turns are dropped and the rest re-encoded.

Rows: each conversation owns two cache rows, row 0 for the speaking item and row 1 for the text-only
item of the batch-parallel pair. A text-only turn runs on row 1 alone and is queued into row 0's
history (and vice versa), to be encoded the next time that row is used.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import numpy as np
import torch

from omnitalk.codec import SAMPLES_PER_FRAME, SNAC_SAMPLE_RATE
from omnitalk.engine import ChunkAssembler, OmniModel, Request, StreamChunk
from omnitalk.errors import InputError, OmnitalkError
from omnitalk.generate import Sampling, Step, StepRules, shared_prefix

FRAME_MS = SAMPLES_PER_FRAME / SNAC_SAMPLE_RATE * 1000  # 85.33 ms of speech per SNAC frame
_END = object()
log = logging.getLogger("omnitalk.session")


class CapacityError(OmnitalkError):
    """More sessions than the scheduler was configured for."""


@dataclass
class Segment:
    """Columns appended to a row's context: ids (8, T) and (position-in-segment, (n, C)) features."""
    ids: torch.Tensor
    features: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    turn: int = 0         # index into Conversation.history: which turn these columns belong to
    answer: bool = False  # answer columns + one closing column (else: a prompt)

    @property
    def length(self) -> int:
        return self.ids.size(1)


@dataclass
class Turn:
    role: str                     # "user" or "assistant"
    text: str = ""
    response_id: str | None = None
    audio_ms: float = 0.0         # assistant: speech generated (or heard, after truncate)
    steps: list = field(default_factory=list, repr=False)  # assistant: the recorded steps


class Response:
    """One answer being generated. Iterate (blocking or async) for StreamChunks; `cancel()` stops it."""

    def __init__(self, conv: "Conversation", req: Request, stream_mode: str, stride: int):
        self.id = "resp_" + uuid.uuid4().hex[:20]
        self.conv, self.req = conv, req
        self.status = "in_progress"
        self.steps: list[Step] = []
        self.usage = dict(input_tokens=req.prompts[0].length, output_tokens=0)
        self._q: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._asm = ChunkAssembler(conv.model, req.speaks, stream_mode, stride)
        self.error: Exception | None = None
        self._wake = None  # set while an async consumer waits: wakes its event loop (thread-safe)

    # -- consumer side --------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            item = self._q.get()
            if item is _END:
                yield from self._asm.finish()
                return
            if isinstance(item, Exception):
                raise item
            yield from self._asm.push(item)

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        # Waiting costs no thread: the scheduler thread wakes this loop when it queues a step.
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        self._wake = wake
        try:
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    ready.clear()  # a wake queued before this point runs after it (on this loop): never lost
                    await ready.wait()
                    continue
                if item is _END:
                    for c in await asyncio.to_thread(self._asm.finish):
                        yield c
                    return
                if isinstance(item, Exception):
                    raise item
                for c in await asyncio.to_thread(self._asm.push, item):  # SNAC decoding off the event loop
                    yield c
        finally:
            self._wake = None

    def wait(self) -> "Response":
        for _ in self:
            pass
        return self

    @property
    def text(self) -> str:
        L = self.conv.model.layout
        ids = [s.text for s in self.steps]
        ids = ids[:ids.index(L.eot)] if L.eot in ids else ids
        return self.conv.model.tokenizer.decode(ids).strip()

    @property
    def audio_ms(self) -> float:
        return max(len(self.steps) - 7, 0) * FRAME_MS if self.req.speaks else 0.0

    # -- producer side (scheduler thread) -------------------------------------------------
    def _put(self, item) -> None:
        self._q.put(item)
        wake = self._wake
        if wake is not None:
            wake()

    def _push(self, step: Step) -> None:
        self.steps.append(step)
        self.usage["output_tokens"] = len(self.steps)
        self._put(step)

    def _finish(self, status: str, error: Exception | None = None) -> None:
        self.status = status
        if error is not None:
            self.error = error
            self._put(error)
        self._put(_END)


class _Row:
    """One cache row's context: its segments, how many columns exist and how many are cached."""

    def __init__(self, index: int):
        self.index = index
        self.segments: list[Segment] = []
        self.cached = 0  # leading columns whose keys/values are in the cache

    @property
    def columns(self) -> int:
        return sum(s.length for s in self.segments)

    def pending(self) -> tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
        """The columns not yet in the cache, as one (8, T) block with its features (block positions)."""
        ids, feats, start = [], [], 0
        for seg in self.segments:
            lo = max(self.cached - start, 0)
            if lo < seg.length:
                offset = sum(x.size(1) for x in ids)
                ids.append(seg.ids[:, lo:])
                feats += [(offset + p - lo, f[max(lo - p, 0):]) for p, f in seg.features if p + f.size(0) > lo]
            start += seg.length
        return (torch.cat(ids, 1) if ids else None), feats


class Conversation:
    """One user's multi-turn state. Thread-safe for one caller at a time."""

    def __init__(self, scheduler: "Scheduler", slot: int, internal: bool = False):
        self.scheduler, self.model, self.slot, self.internal = scheduler, scheduler.model, slot, internal
        self.rows = [_Row(2 * slot), _Row(2 * slot + 1)]
        self.history: list[Turn] = []
        self.closed = False
        self.active: Response | None = None

    def respond(self, *, audio=None, image=None, text: str | None = None, reply: str = "speech",
                task: str = "qa", max_tokens: int = 2048, sampling: Sampling = Sampling(),
                sr: int = 16000) -> Response:
        """Start an answer to a user turn; `audio` is a float32 array at `sr` (16 kHz) or a file."""
        if self.closed:
            raise InputError("this conversation is closed; open a new one")
        if self.active is not None and self.active.status == "in_progress":
            raise InputError("a response is already in progress; cancel it first")
        req = self.model.request(audio=audio, image=image, text=text, reply=reply, task=task,
                                 sr=sr if isinstance(audio, np.ndarray) else None)
        self.history.append(Turn("user", text or ""))
        resp = Response(self, req, self.scheduler.stream_mode, self.scheduler.stride)
        self.active = resp
        self.scheduler._submit(self, resp, max_tokens, sampling)
        return resp

    def truncate(self, response_id: str, audio_end_ms: float) -> None:
        """Keep only what the user heard of an answer: steps up to the last frame played."""
        self.scheduler._call(lambda: self._truncate(response_id, audio_end_ms))

    def reset(self) -> None:
        self.scheduler._call(self._reset)

    def close(self, wait: bool = True) -> None:
        """Cancel any answer and free the cache rows. wait=False only queues the release (it never blocks,
        so it is safe from an event loop or while being cancelled)."""
        if not self.closed:
            self.closed = True
            if self.active is not None:
                self.active.cancel()
            self.scheduler._release(self, wait)

    # -- scheduler thread -----------------------------------------------------------------
    def _reset(self) -> None:
        for r in self.rows:
            r.segments, r.cached = [], 0
        self.history.clear()

    def _truncate(self, response_id: str, audio_end_ms: float) -> None:
        turn = next((i for i, t in enumerate(self.history) if t.response_id == response_id), None)
        if turn is None:
            raise InputError(f"no assistant turn with response id {response_id!r} in this conversation")
        frames = math.ceil(max(audio_end_ms, 0) / FRAME_MS)
        keep = frames + 7 if frames else 0  # frame f is complete once layer 6 arrived, at step f+7
        L = self.model.layout
        for row in self.rows:
            start = 0
            for seg in row.segments:
                if seg.turn == turn and seg.answer:
                    n = seg.length - 1  # the answer columns, then the closing column
                    if keep < n:
                        seg.ids = torch.cat([seg.ids[:, :keep], seg.ids[:, -1:]], 1)
                        row.cached = min(row.cached, start + keep)
                start += seg.length
        t = self.history[turn]
        ids = [s.text for s in t.steps[:keep]]
        ids = ids[:ids.index(L.eot)] if L.eot in ids else ids
        t.text = self.model.tokenizer.decode(ids).strip()
        t.audio_ms = min(t.audio_ms, audio_end_ms)


@dataclass
class _Active:
    conv: Conversation
    resp: Response
    rules: StepRules
    rows: list[_Row]
    answer: list[list[torch.Tensor]]  # per row: fed columns (8,) of this answer
    h: torch.Tensor | None = None      # last hidden states (B, C), to sample the next step from


class Scheduler:
    """Shares one OmniModel between conversations; one background thread batches their decode steps."""

    def __init__(self, model: OmniModel, max_sessions: int = 8, max_len: int | None = None, stride: int = 4,
                 stream_mode: str = "context", asr_slots: int | None = None, answer_reserve: int = 512):
        """asr_slots: cache rows kept for the model's own speech recognition (input transcription and the
        stop-command looks of every session); default one per 4 sessions, at least 2."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        asr_slots = max(2, -(-max_sessions // 4)) if asr_slots is None else asr_slots
        if asr_slots < 1:
            raise ValueError("asr_slots must be >= 1")
        self.model, self.max_sessions, self.stride, self.stream_mode = model, max_sessions, stride, stream_mode
        self.answer_reserve = answer_reserve  # positions kept free for an answer before old turns go
        self.max_len = min(max_len or model.cfg.block_size, model.cfg.block_size)
        n_slots = max_sessions + asr_slots
        self.caches = model.lm.slot_caches(2 * n_slots, self.max_len)
        self._free = deque(range(max_sessions))
        self._asr_free: queue.Queue = queue.Queue()
        for s in range(max_sessions, n_slots):
            self._asr_free.put(Conversation(self, s, internal=True))
        self._lock = threading.Condition()
        self._pending: deque = deque()   # (conv, resp, max_tokens, sampling) waiting for their prefill
        self._calls: deque = deque()     # functions to run on the scheduler thread (truncate, ...)
        self._active: list[_Active] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps_run = 0               # batched forward passes (for tests and metrics)
        self.max_batch_rows = 0          # most rows ever decoded in one forward pass

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="omnitalk-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def sessions(self) -> int:
        return self.max_sessions - len(self._free)

    def open(self) -> Conversation:
        with self._lock:
            if not self._free:
                raise CapacityError(f"all {self.max_sessions} sessions are in use; try again later or start "
                                    "the server with a larger --max-sessions")
            return Conversation(self, self._free.popleft())

    def transcribe(self, audio_16k: np.ndarray, max_tokens: int = 256) -> str:
        """The model's own speech recognition (ASR task), batched with the other sessions' steps."""
        conv = self._asr_free.get()
        try:
            conv.reset()
            return conv.respond(audio=audio_16k, task="asr", reply="text", max_tokens=max_tokens).wait().text
        finally:
            self._asr_free.put(conv)

    def listen(self, audio_16k: np.ndarray) -> list[int]:
        """The model's listening item over user speech (OmniModel.listen: one irq / n_irq status per
        SNAC frame), run on the scheduler thread between decode steps."""
        box: list = []
        self._call(lambda: box.append(self.model.listen(audio_16k, sr=16000)))
        return box[0]

    # -- calls from other threads ---------------------------------------------------------
    def _submit(self, conv: Conversation, resp: Response, max_tokens: int, sampling: Sampling) -> None:
        with self._lock:
            if self._thread is None:
                raise OmnitalkError("the scheduler is not running; call start() first")
            self._pending.append((conv, resp, max_tokens, sampling))
            self._lock.notify_all()

    def _call(self, fn, wait: bool = True) -> None:
        """Run fn on the scheduler thread (between steps) and wait for it; re-raise its error."""
        if self._thread is None or threading.current_thread() is self._thread:
            fn()
            return
        if not wait:
            def run_quietly():
                try:
                    fn()
                except Exception:  # nobody waits for it: log, keep the loop alive
                    log.exception("scheduler call failed")
            with self._lock:
                self._calls.append(run_quietly)
                self._lock.notify_all()
            return
        done, box = threading.Event(), []

        def run():
            try:
                fn()
            except Exception as e:  # handed back to the caller
                box.append(e)
            done.set()

        with self._lock:
            self._calls.append(run)
            self._lock.notify_all()
        done.wait()
        if box:
            raise box[0]

    def _release(self, conv: Conversation, wait: bool = True) -> None:
        def free():
            for a in [a for a in self._active if a.conv is conv]:
                self._finish(a, "cancelled")
            conv._reset()
            if not conv.internal:
                self._free.append(conv.slot)
        self._call(free, wait)

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._pending or self._calls or self._active):
                    self._lock.wait()
                if self._stop:
                    for a in list(self._active):
                        self._finish(a, "cancelled")
                    while self._pending:
                        self._pending.popleft()[1]._finish("cancelled")
                    return
                calls, self._calls = list(self._calls), deque()
                pending = list(self._pending)
                self._pending.clear()
            for fn in calls:
                fn()
            for conv, resp, max_tokens, sampling in pending:
                try:
                    self._admit(conv, resp, max_tokens, sampling)
                except Exception as e:  # a bad request fails alone
                    resp._finish("failed", e)
            if self._active:
                try:
                    self._step()
                except Exception as e:  # never leave consumers hanging
                    for a in list(self._active):
                        self._finish(a, "failed", e)

    @torch.inference_mode()
    def _admit(self, conv: Conversation, resp: Response, max_tokens: int, sampling: Sampling) -> None:
        req, lm, L = resp.req, self.model.lm, self.model.layout
        if resp.cancelled or conv.closed:
            resp._finish("cancelled")
            return
        rows = {"pair": conv.rows, "speech": conv.rows[:1], "text": conv.rows[1:]}[req.mode]
        T = req.prompts[0].length
        if T + 2 > self.max_len:
            raise InputError(f"the input takes {T} positions but a session holds {self.max_len}; shorten it")
        turn = len(conv.history) - 1
        # make room: drop the oldest turns until prompt + answer + closing column fit every row
        need = T + min(max_tokens, self.answer_reserve, self.max_len - T - 1) + 1
        for row in conv.rows:
            while row.segments and row.columns + need > self.max_len:
                first = row.segments[0].turn
                row.segments = [s for s in row.segments if s.turn != first]
                row.cached = 0
        budget = min(max_tokens, self.max_len - max(r.columns for r in rows) - T - 1)
        rules = StepRules(lm, L, req.mode, max(budget, 1), sampling)
        feats = req.features
        pending = []
        for i, row in enumerate(rows):
            row.segments.append(Segment(torch.as_tensor(req.prompts[i].ids), feats, turn))
            pending.append(row.pending())
        dev = rules.inputs.device
        if _same_start(rows, pending):  # one pass for both rows, their common prefix computed once
            ids = torch.stack([p[0] for p in pending]).to(dev)                                  # (2, 8, T)
            x = lm.embed(ids, [(p, f[None].expand(2, -1, -1)) for p, f in pending[0][1]])
            h = lm.prefill(x, rows[0].cached, shared_prefix(ids), self.caches,
                           torch.tensor([r.index for r in rows]))
        else:
            hs = []
            for row, (ids, fs) in zip(rows, pending):
                x = lm.embed(ids[None].to(dev), [(p, f[None]) for p, f in fs])
                hs.append(lm.forward_hidden(x, row.cached, self.caches, torch.tensor([row.index]))[:, -1])
            h = torch.cat(hs, 0)
        for row in rows:
            row.cached = row.columns
        # rows this request does not use get the text-only view of the prompt, encoded later
        for row in conv.rows:
            if row not in rows:
                ids = torch.as_tensor(req.prompts[-1].ids).clone()
                ids[:, -1] = _text_view(L, ids[:, -1])
                row.segments.append(Segment(ids, feats, turn))
        a = _Active(conv, resp, rules, rows, [[] for _ in rows], h)
        conv.history.append(Turn("assistant", response_id=resp.id))
        self._active.append(a)

    @torch.inference_mode()
    def _step(self) -> None:
        lm = self.model.lm
        # 1. sample every active request's next step from its last hidden states
        for a in list(self._active):
            if a.resp.cancelled or a.conv.closed:
                self._finish(a, "cancelled")
                continue
            step = a.rules.take(a.h)
            if step is None:
                self._finish(a, "completed")
                continue
            a.resp._push(step)
            if a.rules.done:
                self._finish(a, "incomplete")  # the token budget is spent
        if not self._active:
            return
        # 2. one forward pass for all of them: each row at its own position
        ids = torch.cat([a.rules.inputs for a in self._active], 0)                       # (R, 8, 1)
        rows = torch.tensor([r.index for a in self._active for r in a.rows])
        pos = torch.tensor([r.cached for a in self._active for r in a.rows], device=ids.device)
        h = lm.forward_hidden(lm.embed(ids), pos, self.caches, rows)[:, -1]               # (R, C)
        self.steps_run += 1
        self.max_batch_rows = max(self.max_batch_rows, len(rows))
        i = 0
        for a in self._active:
            n = len(a.rows)
            a.h = h[i:i + n]
            for j, row in enumerate(a.rows):
                a.answer[j].append(a.rules.inputs[j, :, 0].cpu().clone())  # inputs is reused next step
                row.cached += 1
            i += n

    def _finish(self, a: _Active, status: str, error: Exception | None = None) -> None:
        """Close an answer: its fed columns + a closing column join every row's history."""
        if a in self._active:
            self._active.remove(a)
        L = self.model.layout
        conv, turn = a.conv, len(a.conv.history) - 1
        for j, row in enumerate(a.rows):
            cols = a.answer[j]
            row.segments.append(_answer_segment(L, cols, speaking=(a.rules.mode != "text" and j == 0), turn=turn))
            row.cached = row.columns - 1  # the closing column is encoded with the next turn
        text_row = a.rows[-1]
        for row in conv.rows:  # the unused row learns the turn in its text-only view
            if row not in a.rows:
                cols = [_text_view(L, c) for c in a.answer[a.rows.index(text_row)]]
                row.segments.append(_answer_segment(L, cols, speaking=False, turn=turn))
        t = conv.history[turn] if conv.history and conv.history[turn].response_id == a.resp.id else None
        if t is not None:
            t.text, t.audio_ms, t.steps = a.resp.text, a.resp.audio_ms, a.resp.steps
        a.resp._finish(status, error)


def _same_start(rows: list[_Row], pending: list) -> bool:
    """Two rows whose uncached columns start at the same position, are as long and carry the same
    features (a pair's first turn, or turns after the same history): they can be prefilled together."""
    if len(rows) != 2 or rows[0].cached != rows[1].cached:
        return False
    (ids0, f0), (ids1, f1) = pending
    return ids0.shape == ids1.shape and len(f0) == len(f1) and all(
        p == q and a.shape == b.shape and (a is b or torch.equal(a, b)) for (p, a), (q, b) in zip(f0, f1))


def _closing(L, speaking: bool) -> torch.Tensor:
    audio = L.eoa if speaking else L.pad_a
    return torch.tensor([L.shift(audio, j) for j in range(L.n_audio_layers)] + [L.eot])


def _text_view(L, col: torch.Tensor) -> torch.Tensor:
    out = col.clone()
    out[:L.n_audio_layers] = torch.tensor([L.shift(L.pad_a, j) for j in range(L.n_audio_layers)])
    return out


def _answer_segment(L, cols: list[torch.Tensor], speaking: bool, turn: int) -> Segment:
    return Segment(torch.stack(cols + [_closing(L, speaking)], 1), [], turn, answer=True)  # (8, n + 1)
