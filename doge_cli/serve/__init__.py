"""``doge serve``: a model behind OpenAI's chat and completions API, with a chat page (app.py), generated
by the engine on a thread of its own (worker.py)."""
