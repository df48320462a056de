"""The job's own progress on the driver's terminal, relayed from rank 0 of each stage.

Ray forwards every worker's output (and Ray Train's own chatter) to the driver when asked to; the
driver asks it not to (:func:`pipeline.ray_runtime.ensure_ray`), so that output stays in Ray's log folder
and dashboard, and our stages send their progress through a small Ray queue instead. Step records
become one bar per stage on a terminal, or a line every tenth of the run when output is a file.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

Progress = Callable[[str], None]


class ProgressRelay:
    """A Ray queue that the workers of a job's stages write to, drained by a thread that shows what arrives.

    One queue (one Ray actor, one more Python process to start) serves all the job's stages: :meth:`start`
    and :meth:`stop` bracket each stage, :meth:`close` ends the job's."""

    def __init__(self, progress: Progress) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.progress, self.stage = progress, ""
        self.bar = None
        self.last_line_step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.abandoned = False

    def start(self, stage: str) -> None:
        """Show what arrives from now on as `stage`'s."""
        self.stage, self.bar, self.last_line_step = stage, None, 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._drain, name=f"fip-progress-{stage}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Show what the stage still queued (its workers are done: their puts have all arrived), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self._show(self.queue.get(timeout=0.5))
            except Empty:
                if self._stop.is_set():
                    return
            except Exception:  # the queue's actor is gone (Ray shut down): nothing more will come
                return

    def _show(self, event) -> None:
        if isinstance(event, str):
            if self.bar is not None:
                self.bar.write(f"[fip] {event}")
            else:
                self.progress(f"[fip] {event}")
            return
        done, total = int(event["step"]), int(event["total"])
        if self.progress is print and sys.stdout.isatty():
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=f"[fip] {self.stage}", unit="step", initial=0)
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(ce=f"{event['ce']:.3f}")
        elif done - self.last_line_step >= max(total // 10, 1) or done == total:
            self.last_line_step = done
            left = (total - done) / max(event["rate"], 1e-9)
            self.progress(f"[fip] {self.stage}: step {done}/{total}, ce {event['ce']:.4f}, "
                          f"{event['rate']:.2f} steps/s, {left:.0f}s left")

    def abandon(self) -> None:
        """Let go without another call into Ray (the job was interrupted, and Ray may be going down with it):
        the drain thread is told to end, and :meth:`close` leaves the queue's actor to Ray's shutdown."""
        self._stop.set()
        self._thread = None
        self.abandoned = True

    def close(self) -> None:
        """Stop, and end the queue's actor."""
        self.stop()
        if self.abandoned:
            return
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:
            pass
