"""The terminal front end of `v4 chat` and `v4 ask`.

`conversation` (history, /save and /load, prompt ids), `slash` (slash commands as data, multi-line input) and
`answer` (model resolution, loading, prompt ids for ask, running one turn through a Session) know nothing about
the terminal. `render` is the one Rich streaming renderer both commands use; `flags` declares their shared options.
"""
