"""A small FastAPI service to deploy as a cellnode docker node: the reference tutorial's service, with the endpoints
a load balancer and a metrics scraper need.

    POST /predict        {"values": [1, 2, 3]} -> {"sum": 6, "mean": 2.0, "instance": "<instance ID>"}
    GET  /health-check   200 {"status": "ok"} while the service can take requests
    GET  /metrics        Prometheus text: predictions served, and their sizes

It listens where cellnode tells it (`CELLNODE_HOST` and `PORT`; 127.0.0.1:9875 when run by hand), so several
instances of the image can run side by side on one machine's network.
"""

from __future__ import annotations

import os

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

app = FastAPI(title="example docker node")
PREDICTIONS = Counter("predictions", "Predictions served.")
SIZES = Histogram("prediction_values", "Values per prediction request.", buckets=(1, 10, 100, 1000))
INSTANCE = os.environ.get("CELLNODE_INSTANCE_ID", "local")


class Values(BaseModel):
    values: list[float] = Field(min_length=1, max_length=100_000)


@app.post("/predict")
def predict(body: Values) -> dict[str, object]:
    PREDICTIONS.inc()
    SIZES.observe(len(body.values))
    total = sum(body.values)
    return {"sum": total, "mean": total / len(body.values), "instance": INSTANCE}


@app.get("/health-check")
def health_check() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/metrics")
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


if __name__ == "__main__":
    uvicorn.run(app, host=os.environ.get("CELLNODE_HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "9875")))
