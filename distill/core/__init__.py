"""The core: the noise process (``schedules``), conversions between network outputs (``param``), time grids
(``grids``), the denoiser contract and its wrappers (``denoisers``), conditioning (``conditioning``) and the small
networks shared by every layer (``nets``). Imports nothing else of the project (docs/architecture.md)."""
