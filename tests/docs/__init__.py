"""The code blocks of the documentation, run as tests."""
