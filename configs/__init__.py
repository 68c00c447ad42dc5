"""The configs that ship with latent-bench (``benchmark.configs`` once installed): trainer/, data/, model/ and
studies/ YAMLs that a study names by key, found from any folder."""
