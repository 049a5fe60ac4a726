"""``vigil-gateway``: Vigil's HTTP API."""

from __future__ import annotations

from vigil import runner
from vigil_gateway.service import Gateway
from vigil_gateway.settings import GatewaySettings


def main() -> None:
    runner.main("vigil-gateway", GatewaySettings, Gateway)


if __name__ == "__main__":
    main()
