"""Long-form jobs: a txt/epub book (or text) becomes one audio file with chapters, in the background.

- text.py / epub.py: chapters from a plain text's headings or an EPUB's spine and table of contents;
- store.py: the durable job table (SQLite or PostgreSQL) with atomic claims and heartbeats;
- worker.py: the workers in the gateway process (at most max_jobs at once), part by part, resumable;
- m4b.py: the finished file (M4B with chapters, tags and cover; MP3, Opus, FLAC, WAV);
- routes.py: the HTTP API (`/v1/audio/jobs...`) and the web page at `/`.
"""
