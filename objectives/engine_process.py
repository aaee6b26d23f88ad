"""A slot engine in a process of its own: its passes never wait for the trials' bookkeeping.

In one process, every trial's Optuna and MLflow work (threads of Python) and the engine's kernel launches take
turns at one interpreter lock; at 64 slots on an H200 the engine in a process of its own ran 1.65x the trials per
hour of the engine beside the bookkeeping (BENCHMARKS.md, benchmark 5). :class:`EngineProcess` starts the engine
in a child process with the worker's base and data and runs each trial in it as :meth:`SlotEngine.run` would: the
trial's hooks run in the caller's thread, from the events the child sends. A finished run's adapter stays in the child
until its hook saves it (:class:`AdapterInChild`). A launch starts the child before it loads its own base and data
(:class:`Prestarted`), so the child's imports and its loading of the base overlap the launch's.

The child ends when its parent does (its end of the pipe closes), whatever signal ended the parent; it ignores
the terminal's interrupt and a scheduler's SIGTERM, which reach the whole process group: the parent stops its
trials and then closes the engine. If the child dies, its runs fail with the reason and the next run starts a
fresh one (at most :data:`RESTARTS` times).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from objectives.config import ModelConfig, RecipeConfig
from objectives.data import TokenizedSplits
from objectives.engine import EngineShape, Event, Job, SlotEngine, follow
from objectives.host_turns import TURNS
from objectives.objective import RunHooks, RunResult

log = logging.getLogger(__name__)
RESTARTS = 2
"""How often a worker starts a fresh engine process after one died, before its runs fail at once."""
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
"""The terminal's interrupt and a scheduler's stop, which reach the whole process group."""


class EngineProcessDied(RuntimeError):
    """The engine's process ended while it trained this run."""


@dataclass
class EngineSpec:
    """What the child needs to build the engine: the same base and data as the parent's, the plan's decisions."""

    model: ModelConfig
    device: str
    data: TokenizedSplits
    slots: int
    r_max: int
    checkpointing: bool
    base_cache: bool
    eval_batch_size: int
    packing: bool
    fused_loss: Any
    per_pass: Callable[[int, int, bool], bool] | None = None
    """Checkpointing per pass (:class:`objectives.decisions.PassCheckpointing`; it crosses pickled)."""
    prepare: Callable[[], None] | None = None
    """Run first in a child that :class:`EngineProcess` starts (a module-level function: it crosses by name), e.g.
    the caller's log filters; a :class:`Prestarted` child was given its own."""

    def build(self, loaded: Any = None) -> SlotEngine:
        """The engine on ``loaded`` (this spec's base, loaded by the child before the spec came) or on a base
        loaded now."""
        from objectives.base import ResidentBase

        base = loaded if loaded is not None else ResidentBase(self.model, torch.device(self.device))
        base.use_checkpointing(self.checkpointing)
        base.use_base_cache(self.base_cache)
        # No bookkeeping shares this process: the engine need not take turns with it.
        return SlotEngine(base, self.data, self.slots, self.r_max, eval_batch_size=self.eval_batch_size,
                          packing=self.packing, fused_loss=self.fused_loss, host_turns=False,
                          per_pass=self.per_pass)


def _send(conn: Connection, lock: threading.Lock, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(data)


def _received(conn: Connection) -> Iterator[tuple[Any, ...]]:
    """The messages from the other side, until it closes its end."""
    while True:
        try:
            yield pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return


def _portable(error: BaseException) -> BaseException:
    """``error`` if it crosses to the other process intact, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class Prestarted:
    """A child started early: it imports torch and the model libraries and, given ``model``, loads that base on
    ``device`` (the larger part of its start-up) while the caller loads its own base and data; then it builds the
    engine from the :class:`EngineSpec` that :class:`EngineProcess` sends it. Closing it unused ends the child."""

    def __init__(self, prepare: Callable[[], None] | None = None, model: ModelConfig | None = None,
                 device: str | None = None) -> None:
        context = multiprocessing.get_context("spawn")  # a CUDA context does not survive a fork
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=serve_when_told, args=(child_end, prepare, model, device),
                                       name="slot-engine", daemon=True)
        # Born with the terminal's and a scheduler's signals blocked (the mask survives exec), so an interrupt
        # during its start-up does not end it with a traceback; it ignores them, then unblocks.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child_end.close()
        # Registered after multiprocessing's own exit handler, so it runs first: that handler joins daemon
        # children after a SIGTERM, which this one ignores, and would wait for ever.
        atexit.register(EngineProcess._end_child, self.process, self.conn)

    def close(self) -> None:
        """End a child that was never handed a spec: it holds nothing that needs a clean exit."""
        self.conn.close()
        self.process.kill()
        self.process.join(timeout=10)


class EngineProcess:
    """The caller's side: :meth:`run` and :meth:`close` as :class:`SlotEngine` has them, the engine in a child.

    Example:
        >>> spec = EngineSpec(cfg.model, "cuda", data, 64, 64, False, True, 4, True, False)  # doctest: +SKIP
        >>> engine = EngineProcess(spec)  # doctest: +SKIP
        >>> result = engine.run(trial_cfg, hooks)  # doctest: +SKIP
        >>> engine.close()  # doctest: +SKIP
    """

    def __init__(self, spec: EngineSpec, prestarted: Prestarted | None = None) -> None:
        """Start the child (or hand ``prestarted`` the spec) and wait until its engine is built.

        Raises:
            RuntimeError: the child could not build the engine (the reason is the child's), or it died doing so.
        """
        self.spec = spec
        self._prestarted = prestarted
        self.restarts = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._events: dict[int, queue.SimpleQueue[Event | None]] = {}
        self._outcomes: dict[int, RunResult | BaseException] = {}
        self._replies: dict[int, queue.SimpleQueue[BaseException | None]] = {}
        self._closed = False
        self._start()

    def _start(self) -> None:
        prestarted, self._prestarted = self._prestarted, None
        if prestarted is None or not prestarted.process.is_alive():
            if prestarted is not None:
                prestarted.close()
            prestarted = Prestarted(self.spec.prepare)
        self.process, self._conn = prestarted.process, prestarted.conn
        try:
            _send(self._conn, self._send_lock, ("spec", self.spec))
        except OSError:
            pass  # the child is gone: the wait below says so
        except BaseException:  # the spec did not pickle
            prestarted.close()
            raise
        try:
            while not self._conn.poll(1.0):
                if not self.process.is_alive():
                    raise EOFError
            kind, payload = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._end_child(self.process, self._conn)
            raise RuntimeError(f"the engine's process ended while loading the base (exit code "
                               f"{self.process.exitcode})") from None
        if kind == "failed":
            self._end_child(self.process, self._conn)
            raise payload
        self.shape: EngineShape = payload
        self.alive = True
        self._receiver = threading.Thread(target=self._receive, args=(self._conn, self.process),
                                          name="slot-engine-receiver", daemon=True)
        self._receiver.start()

    @staticmethod
    def _end_child(process: Any, conn: Connection) -> None:
        """Close the pipe (the child's cue to exit) and kill the child if it does not."""
        conn.close()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)

    @property
    def usable(self) -> bool:
        """Whether a run can still train here: not closed, and the child alive or one more restart allowed."""
        return not self._closed and (self.alive or self.restarts < RESTARTS)

    def run(self, cfg: RecipeConfig, hooks: RunHooks | None = None) -> RunResult:
        """Run ``cfg`` in a slot of the child's engine and wait for it (see :meth:`SlotEngine.run`)."""
        hooks = hooks or RunHooks()
        cfg = self.shape.as_trained(cfg)
        with TURNS.bookkeeping():
            hooks.on_start(cfg)
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if not self.alive:
                self._restart()
            job_id = next(self._ids)
            self._events[job_id] = events
            conn = self._conn
        # A child that just died: the receiver's clean-up ends this run with the reason.
        with contextlib.suppress(OSError):
            _send(conn, self._send_lock, ("run", job_id, cfg))
        followed = False
        try:
            stopped = follow(events, hooks, lambda e: self._stop(conn, job_id))
            followed = True
        finally:
            if not followed:  # interrupted while it waited: the run need not go on
                self._stop(conn, job_id)
            with contextlib.suppress(OSError):
                _send(conn, self._send_lock, ("release", job_id))  # its adapter: the hooks are done with it
        outcome = self._outcomes.pop(job_id)
        if stopped is not None:
            raise stopped
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def save_adapter(self, job_id: int, folder: str) -> None:
        """Have the child write a finished run's adapter (:class:`AdapterInChild`) as a peft folder."""
        reply: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        with self._lock:
            if not self.alive:
                raise EngineProcessDied("the engine's process ended before the adapter was saved")
            request = next(self._ids)
            self._replies[request] = reply
            conn = self._conn
        with contextlib.suppress(OSError):  # a child that just died: the receiver's clean-up answers
            _send(conn, self._send_lock, ("save", request, job_id, folder))
        if (error := reply.get()) is not None:
            raise error

    def _stop(self, conn: Connection, job_id: int) -> None:
        with contextlib.suppress(OSError):  # the child is gone: the run ends anyway
            _send(conn, self._send_lock, ("stop", job_id))

    def _restart(self) -> None:
        if self.restarts >= RESTARTS:
            raise EngineProcessDied(f"the engine's process died {self.restarts + 1} times; not starting another")
        self.restarts += 1
        log.warning("the engine's process died (exit code %s); starting a fresh one", self.process.exitcode)
        self._start()

    def _receive(self, conn: Connection, process: Any) -> None:
        try:
            for message in _received(conn):
                try:
                    self._deliver(message)
                except Exception:  # one bad message must not leave every run waiting
                    log.exception("a message from the engine's process could not be delivered: %.200r", message)
        finally:
            process.join(timeout=30)
            with self._lock:
                self.alive = False
                died = f"the engine's process ended (exit code {process.exitcode})"
                for job_id, events in self._events.items():
                    self._outcomes[job_id] = EngineProcessDied(f"{died} while this run trained")
                    events.put(None)
                for reply in self._replies.values():
                    reply.put(EngineProcessDied(f"{died} before the adapter was saved"))
                self._events.clear()
                self._replies.clear()

    def _deliver(self, message: tuple[Any, ...]) -> None:
        if message[0] == "event":
            _, job_id, name, args = message
            if name == "on_finish":
                args[1].engine = self
            self._events[job_id].put((name, args))
        elif message[0] == "saved":
            _, request, error = message
            with self._lock:
                reply = self._replies.pop(request)
            reply.put(error)
        else:  # done
            _, job_id, outcome = message
            with self._lock:
                self._outcomes[job_id] = outcome
                self._events.pop(job_id).put(None)

    def close(self) -> None:
        """Stop after the current step; unfinished runs fail; the child exits."""
        with self._lock:
            self._closed = True
        if self.alive:
            with contextlib.suppress(OSError):
                _send(self._conn, self._send_lock, ("close",))
            self._receiver.join(timeout=120)
        self._end_child(self.process, self._conn)


class EnginePool:
    """Several engines on one device, each in a process of its own (``workers.engines``): :meth:`run` and
    :meth:`close` as one engine has them, each run in the usable engine with the fewest runs at the time (an engine
    whose child died past its restarts fails a run at once, so it would always have the fewest)."""

    def __init__(self, engines: Sequence[EngineProcess]) -> None:
        self.engines = list(engines)
        self._runs = [0] * len(self.engines)
        self._lock = threading.Lock()

    @classmethod
    def start(cls, spec: EngineSpec, count: int, prestarted: Prestarted | None = None) -> EnginePool:
        """``count`` engines of ``spec``: every child starts loading the base at once, and each is then waited for
        in turn. ``prestarted`` becomes the first."""
        waiting = [prestarted] if prestarted is not None else []
        engines: list[EngineProcess] = []
        try:
            while len(waiting) < count:
                waiting.append(Prestarted(spec.prepare, spec.model, spec.device))
            while waiting:
                engines.append(EngineProcess(spec, waiting.pop(0)))
        except BaseException:
            for child in waiting:
                child.close()
            for engine in engines:
                engine.close()
            raise
        return cls(engines)

    def run(self, cfg: RecipeConfig, hooks: RunHooks | None = None) -> RunResult:
        with self._lock:
            usable = [i for i, engine in enumerate(self.engines) if engine.usable] or list(range(len(self.engines)))
            index = min(usable, key=self._runs.__getitem__)
            self._runs[index] += 1
        try:
            return self.engines[index].run(cfg, hooks)
        finally:
            with self._lock:
                self._runs[index] -= 1

    def close(self) -> None:
        """Close every engine, even when closing one fails (the first failure is raised)."""
        errors: list[BaseException] = []
        for engine in self.engines:
            try:
                engine.close()
            except BaseException as error:
                errors.append(error)
        if errors:
            raise errors[0]


class AdapterInChild:
    """A finished run's adapter as its hook sees it in the parent: the weights stay in the child, which writes the
    folder only when asked. Sending every run's weights (up to 80 MB each, a few runs a second at 64 slots) held
    up every other message, and most adapters are never saved (``tracking.log_adapter=best``)."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.engine: EngineProcess | None = None
        """Set where it arrives."""

    def __getstate__(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "engine": None}

    def save_pretrained(self, folder: str | Path, save_embedding_layers: bool = False) -> None:
        """Write the peft folder (see :meth:`objectives.slots.SlotAdapter.save_pretrained`)."""
        assert self.engine is not None, "an adapter is saved through the engine that sent it"
        self.engine.save_adapter(self.job_id, str(folder))

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory(prefix="slot-adapter-") as tmp:
            self.save_pretrained(tmp)
            return load_file(str(Path(tmp) / "adapter_model.safetensors"))


class _Outbox:
    """The child's messages to its parent, sent from a thread of their own so that the engine's never waits for
    the pipe."""

    def __init__(self, conn: Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock
        self.queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._send_all, name="slot-engine-outbox", daemon=True)
        self.thread.start()

    def put(self, message: tuple[Any, ...]) -> None:
        self.queue.put(message)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _send_all(self) -> None:
        while (message := self.queue.get()) is not None:
            try:
                _send(self.conn, self.lock, message)
            except OSError:  # the parent is gone
                return
            except Exception as e:  # it did not pickle: the run must still end, and the others go on
                log.exception("a message to the launch could not be sent: %.200r", message)
                if message[0] in ("done", "saved"):
                    with contextlib.suppress(OSError):
                        _send(self.conn, self.lock, (*message[:2], RuntimeError(f"{type(e).__name__}: {e}")))


class _JobEvents:
    """A job's events as the engine posts them (``put``), forwarded to the parent; None: the job's outcome. A
    finished adapter stays here (in ``adapters``) until the parent has it saved or releases it."""

    def __init__(self, outbox: _Outbox, job_id: int, jobs: dict[int, Job], adapters: dict[int, Any]) -> None:
        self.outbox = outbox
        self.job_id = job_id
        self.jobs = jobs
        self.adapters = adapters

    def put(self, event: Event | None) -> None:
        if event is not None:
            name, args = event
            if name == "on_finish":
                result, self.adapters[self.job_id] = args
                args = (result, AdapterInChild(self.job_id))
            self.outbox.put(("event", self.job_id, name, args))
            return
        job = self.jobs.pop(self.job_id)
        error = job.future.exception()
        self.outbox.put(("done", self.job_id, _portable(error) if error is not None else job.future.result()))


def serve_when_told(conn: Connection, prepare: Callable[[], None] | None, model: ModelConfig | None,
                    device: str | None) -> None:
    """The child: import what the engine needs and load the base it is told of, then wait for the parent's
    :class:`EngineSpec` and :func:`serve` it; exit if the pipe closes first."""
    for signum in STOP_SIGNALS:  # the parent decides when the engine stops
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s (engine process): %(message)s")
    if prepare is not None:
        prepare()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    loaded: Any = None
    if model is not None and device is not None:
        from objectives.base import ResidentBase

        # If this fails (the parent's base may hold the memory now), the spec's build loads it again and reports.
        with contextlib.suppress(Exception):
            loaded = ResidentBase(model, torch.device(device))
    try:
        message = next(_received(conn), None)
    except Exception as e:  # the spec did not unpickle here
        _send(conn, threading.Lock(), ("failed", _portable(e)))
        os._exit(1)
    if message is not None and message[0] == "spec":
        spec = message[1]
        if loaded is not None and (loaded.cfg != spec.model or str(loaded.device) != spec.device):
            from objectives.base import free_accelerator_memory

            loaded = None  # another model: let it go before the spec's loads
            free_accelerator_memory(torch.device(spec.device))
        serve(conn, spec, loaded)
    os._exit(0)


def serve(conn: Connection, spec: EngineSpec, loaded: Any = None) -> None:
    """Build the engine (on ``loaded``, see :meth:`EngineSpec.build`), run what the parent sends until it closes
    the pipe or says close."""
    lock = threading.Lock()
    try:
        engine = spec.build(loaded)
    except BaseException as e:
        _send(conn, lock, ("failed", _portable(e)))
        return
    _send(conn, lock, ("ready", engine.shape))
    outbox = _Outbox(conn, lock)
    jobs: dict[int, Job] = {}
    adapters: dict[int, Any] = {}
    try:
        for message in _received(conn):
            if message[0] == "run":
                _, job_id, cfg = message
                # Drawn here, not in the caller's process: tens of MB of draws cost more to pickle than to draw.
                job = Job(cfg, RunHooks(), started=True, draws=engine.shape.draw(cfg))
                job.events = _JobEvents(outbox, job_id, jobs, adapters)
                jobs[job_id] = job
                engine.enqueue(job)
            elif message[0] == "save":
                _, request, job_id, folder = message
                try:
                    adapters[job_id].save_pretrained(folder)
                    outbox.put(("saved", request, None))
                except Exception as e:
                    outbox.put(("saved", request, _portable(e)))
            elif message[0] == "release":
                adapters.pop(message[1], None)
            elif message[0] == "stop":
                if (stopped := jobs.get(message[1])) is not None:
                    stopped.stop = RuntimeError("stopped by its trial")
            else:  # close
                break
    finally:
        engine.close()
        outbox.close()
        conn.close()
    os._exit(0)  # the engine's daemon threads and CUDA's teardown have nothing left to do
