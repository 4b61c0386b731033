"""Side-by-side benchmarks of clipforge against OpenCLIP, HF transformers and OpenAI's clip.

See bench/__main__.py for the command, and docs/benchmarks.md for the method and the latest results.
"""
