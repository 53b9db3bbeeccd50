"""ZOIExportHook: export ZOIs after evaluation, shaped like detectron2's EvalHook.

It runs after EvalHook in the hook list, so at the final iteration the export follows the final
evaluation; with a period it also follows each periodic evaluation. The work is an injected
function (``export_fn()``), so the hook knows nothing about how an export is done.
"""

from __future__ import annotations

import logging
import time

from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

__all__ = ["ZOIExportHook"]

logger = logging.getLogger(__name__)


class ZOIExportHook(HookBase):
    def __init__(self, period: int, export_fn):
        """
        Args:
            period: export every ``period`` iterations too (0: only after training).
            export_fn: called with no arguments; returns {dataset: summary dict}. Every
                worker calls it (each exports its shard); only the main process logs.
        """
        self._period = period
        self._func = export_fn

    def export_now(self):
        """Run the export now (also used by --eval-only, where there is no training loop)."""
        start = time.perf_counter()
        results = self._func()
        comm.synchronize()
        if comm.is_main_process():
            for name, summary in (results or {}).items():
                logger.info(
                    "ZOI export of %s: %d scans ok, %d failed, %d ZOIs, %d suspected missing, "
                    "%d scans with level conflicts (%.1f s) -> %s",
                    name,
                    summary["scans_ok"],
                    summary["scans_failed"],
                    summary["zois"],
                    summary["suspected_missing"],
                    summary["scans_with_level_conflicts"],
                    time.perf_counter() - start,
                    summary["output_dir"],
                )
                storage = getattr(getattr(self, "trainer", None), "storage", None)
                if storage is not None:
                    storage.put_scalars(
                        **{f"zoi/{name}/zois": summary["zois"]},
                        **{f"zoi/{name}/suspected_missing": summary["suspected_missing"]},
                        smoothing_hint=False,
                    )

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (
            self._period > 0
            and next_iter % self._period == 0
            and next_iter != self.trainer.max_iter
        ):
            self.export_now()

    def after_train(self):
        # as EvalHook: only when training finished (not when it stopped on an exception)
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.export_now()
