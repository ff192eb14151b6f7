"""`kubectl novalet`: every action as the spec field a GitOps user writes, waited on with progress.

`requests` is the pure part (which patch a verb writes, when a request is over and how it ended,
the progress line); `cli` is the thin shell (flags, the apiserver, the terminal).
"""
