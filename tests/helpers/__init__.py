"""What several test files share (imported by them as `helpers.<module>`; no tests here): the one bitwise comparison,
finite-difference gradients, the torch twin of the UNet, optimizer cases, cuBLAS layouts, the CLI contract's
assertions and the fault-injection tools. `pythonpath = ["tests"]` in pyproject.toml makes `helpers` importable from
every folder of the suite; nothing here imports a test module, so no test depends on the order files are collected."""
