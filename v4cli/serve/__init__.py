"""`v4 serve`: the model behind the OpenAI Chat Completions, Anthropic Messages and OpenAI Responses APIs.

core.py is the contract every API module translates to and from; runner.py owns the one engine.
"""
