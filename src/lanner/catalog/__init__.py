"""Choosing a model: the catalog (data files of open models with their
architecture, licence and openness), the memory planner, local model facts and
licence notices. Nothing here imports torch or llama_cpp."""
