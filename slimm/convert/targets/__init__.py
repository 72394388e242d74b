"""One package per target framework: `registry` (its handler table), the op-family handler modules,
`codegen` (the Target: code style and saving an artifact), `runtime` (loading and running a saved
artifact: imports the framework and NumPy only, never the code generator).
"""
