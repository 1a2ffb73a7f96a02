"""`sdxl serve`: AUTOMATIC1111's `/sdapi/v1` API and OpenAI's Images API over one job queue.

    config.py    ServerConfig: what `sdxl serve`'s flags set (limits, auth, folders, devices)
    catalog.py   the models a request may name (listed names only, never paths)
    jobs.py      Job, the queue and one worker thread per device, each owning its pipeline
    work.py      a job's images: GenerationOptions in, PNGs with infotext out (what `sdxl generate` writes)
    a1111_api.py / openai_api.py   request -> job translation as plain functions, and their thin routes
    app.py       the FastAPI application: auth, errors in each API's shape, progress events, metrics

The translators build the same settings dicts the command line builds (`interfaces.metadata`), so a request's
image is the CLI's image for the same settings and seed.
"""
