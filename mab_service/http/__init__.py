"""The HTTP edge: everything between the socket and the endpoints, once for every request.

Read in the order a request meets it:

- ``protocol.py``: uvicorn's httptools protocol with limits on slow and broken clients (head and body time limits,
  a head size limit, a cap on open connections; a request reaches the app only once its body is in), where a
  request (but to a probe) is admitted or marked over the limit on arrival and a fast endpoint's answer leaves in
  one write, and where connections close at shutdown without cutting a request off;
- ``admission.py``: the per-worker ``Admission`` (the in-flight limit and the drain flag) that the protocol, the
  app and the server share;
- ``auth.py``: the API keys of ``api_keys_file``, as digests, reloaded when the file changes;
- ``edge.py``: the ASGI app: API keys (401), fast endpoints ahead of Starlette, request ids, ``Connection: close``
  while draining, metrics per request, the access log;
- ``errors.py``: the one table of exception -> answer, and the one function that reads it;
- ``drain.py``: the uvicorn server that drains on SIGTERM before it stops listening.
"""
