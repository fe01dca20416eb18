"""`python -m apps.<name>` from a source checkout: thin launchers of the apps
in `keras_seltransfer.apps` (installed as the `kst-<name>` console scripts)."""
