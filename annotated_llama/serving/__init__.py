"""The OpenAI-compatible server: schema, scheduler, jobs, metrics and the web page."""
