"""The simulated world: synthetic fleets for the demo, the tests and the benchmarks (not serving code).

A simulated fleet of deployed models (cameras by default) streams one day of predictions. Every
row follows the data contract of DESIGN.md: ``id``, ``logits`` [M, C], ``embedding`` [D],
``source``, ``category``, ``ts``. Beside the fleet file come labelled calibration data, an
in-distribution reference bank and a truth file that only tests and reports read.

Modules, by job:

- :mod:`.config`: :class:`FleetConfig`, every knob of the world, and the constants that define the
  data (generation block size, row kinds, random streams).
- :mod:`.world`: the latent world drawn once per seed (classes, unseen classes, drift, the
  ensemble's heads, traffic); its docstring describes the model.
- :mod:`.blocks`: rows generated block by block from the world, with their truth (OOD rows, the
  burst, drift, traffic, whether the ensemble is wrong).
- :mod:`.encode`: the four files' Arrow schemas and the conversion of blocks into record batches.
- :mod:`.fleet`: the in-memory generators (``generate_*_batches``).
- :mod:`.parquet`: :func:`simulate_fleet`, writing the four Parquet files.
- :mod:`.digits`: a real-data fleet from scikit-learn's digits with the same four files (imports
  torch; not re-exported here).

Determinism: rows are generated in fixed blocks of :data:`GENERATION_BLOCK_ROWS`, each from its own
generator derived from (seed, file stream, block index). The data therefore depend only on the
configuration's data fields, never on batch size, row-group size or threading. Files are
byte-identical for the same configuration on the same platform and library versions; another
numpy (whose generators may change between releases) or another BLAS kernel may change values in
the last bits, never the statistics.
"""

from .config import DAY_MS, GENERATION_BLOCK_ROWS, KINDS, FleetConfig
from .encode import TRUTH_SCHEMA, bank_schema, calibration_schema, fleet_schema
from .fleet import (generate_bank_batches, generate_calibration_batches, generate_fleet_batches,
                    generate_fleet_with_truth)
from .parquet import METADATA_KEY, FleetFiles, fleet_paths, simulate_fleet

__all__ = [
    "DAY_MS",
    "GENERATION_BLOCK_ROWS",
    "KINDS",
    "METADATA_KEY",
    "FleetConfig",
    "FleetFiles",
    "TRUTH_SCHEMA",
    "bank_schema",
    "calibration_schema",
    "fleet_paths",
    "fleet_schema",
    "generate_bank_batches",
    "generate_calibration_batches",
    "generate_fleet_batches",
    "generate_fleet_with_truth",
    "simulate_fleet",
]
