"""Evaluation: lm-evaluation-harness task YAML run on exactly the artefact Lanner
serves, results stored with provenance; side-by-side comparison and a blind arena."""
