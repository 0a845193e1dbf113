"""The randomizer written by hand with FastAPI: the baseline that `execute_vs_fastapi.py` measures cellnode against.

It does what the deployed randomizer node does, the way an engineer would write it as a service of its own: the same
route and body, a pydantic request model, a Bearer token compared in constant time, `randint` with `seed()` once.

    .venv/bin/python bench/fastapi_randomizer.py --port 8090 --token SECRET
"""

from __future__ import annotations

import argparse
import secrets
from random import randint, seed
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel

seed()


class InputData(BaseModel):
    left_bound: int
    right_bound: int


class Inputs(BaseModel):
    input_data: InputData


class ExecuteRequest(BaseModel):
    folder_id: str
    input: Inputs


def build_app(token: str) -> FastAPI:
    app = FastAPI(title="randomizer")
    expected = f"Bearer {token}".encode()

    async def check_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected):
            raise HTTPException(status_code=401, detail="Invalid or missing bearer token.")

    @app.post("/datasphere/v1/nodes/{node_id}:execute", dependencies=[Depends(check_token)])
    async def execute(node_id: str, body: ExecuteRequest) -> dict[str, dict[str, dict[str, int]]]:
        data = body.input.input_data
        return {"output": {"output_data": {"generated_value": randint(data.left_bound, data.right_bound)}}}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True, help="the Bearer token callers must send")
    args = parser.parse_args()
    uvicorn.run(build_app(args.token), host=args.host, port=args.port, workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
