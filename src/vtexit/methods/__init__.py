"""One module per method; each is a policy for the schedule engine plus a function that attaches it."""
