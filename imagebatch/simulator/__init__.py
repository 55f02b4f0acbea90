"""OpenAI-compatible Images API simulator for tests, benchmarks and offline runs.

    from imagebatch.simulator import SimConfig, SimulatorServer
    with SimulatorServer(SimConfig(latency="uniform:0.01,0.05", ipm=60)) as sim:
        ...  # point a client at sim.base_url

Run it in its own process: `python -m imagebatch.simulator --port 8000 --latency 0.05`.
"""

from .app import create_app
from .config import SimConfig
from .server import SimulatorServer, serve_forever

__all__ = ["SimConfig", "SimulatorServer", "create_app", "serve_forever"]
