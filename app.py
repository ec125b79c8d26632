"""recon3d web app: the entry point the Space names. The page is composed in :mod:`recon3d.app`.

    python app.py [--port 7860] [--random-weights] [--device cuda] [--dtype float16] [--output-ttl 3600]
                  [--max-queue 16] [--max-long-queue 4] [--long-runs-per-visitor 1] [--max-text-steps N]
"""

from recon3d.app import main

if __name__ == "__main__":
    main()
