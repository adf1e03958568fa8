"""The web UI's logic, free of Streamlit so it can be unit-tested: settings and path confinement (settings.py),
the form generated from the config schema (form.py) and launching / watching renders (runs.py). webui.py at the
repository root draws it with Streamlit."""
