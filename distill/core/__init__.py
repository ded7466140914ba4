"""The core: the noise process (``schedules``), conversions between network outputs (``param``), time grids
(``grids``), the denoiser contract and its wrappers (``denoisers``), conditioning (``conditioning``), the small
networks shared by every layer (``nets``), output files written whole or not at all (``atomic``) and log lines that
do not print over progress bars (``progress``). Imports nothing else of the project (docs/architecture.md)."""
