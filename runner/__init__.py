"""batchrun: run OpenAI batch job files under a spend cap that cannot be passed."""

__version__ = "0.1.0"
