"""The light client's OpenAI-compatible HTTP endpoint (served on loopback, on trio).

- ``backend``: the ``CompletionBackend`` protocol the HTTP layer runs on, ``ModelCard``,
  ``BackendError``, and ``SingleProviderBackend`` (one connected provider).
- ``server``: ``serve_api`` (hypercorn on trio), bind-address checks, ``parse_listen``.
- ``app``: the Starlette app (routes, bearer key, OpenAI error shape).
- ``openai_request`` / ``openai_response``: request validation and response bodies.
- ``completion_run``: one completion as JSON or server-sent events, cancelled when the
  HTTP client leaves.
- ``chat_format``: chat messages to a prompt, per model family.

Nothing is re-exported here, so importing the backend protocol does not load the web stack.
"""
