"""The small core every part stands on: settings (``config``), errors and the command-line wrapper, artifacts
written atomically with hashed manifests, checkpoints, pinned registry resources, runtime and version fixes,
several-process helpers. Imports nothing from the rest of the package."""
