"""The review routes of the live view (adtr_deploy.runtime.review): GET /review (the page), GET /api/review (the newest
kept frames with their review state), GET /api/review/original.png?id=ID and /api/review/overlay.jpg?id=ID, and
POST /api/review {"id", "label", "by", "note", "relabel"} (control: Host, Origin and token checked by Routes first)."""

from __future__ import annotations

import json

from adtr_deploy.errors import UserError
from adtr_deploy.runtime.review import LABELS
from adtr_deploy.runtime.serve.protocol import Request, Response, error, int_param, json_response

FIELDS = {"id", "label", "by", "note", "relabel"}


def get(routes, req: Request) -> Response:
    review = getattr(routes.service, "review", None)
    if req.path == "/review":
        return Response(200, routes.static["/static/review.html"], "text/html; charset=utf-8")
    if review is None:
        return error(404, "this run has no results folder to review")
    if req.path == "/api/review":
        limit = min(max(int_param(req.query.get("limit"), 50), 1), 500)
        try:
            items = review.listing(limit)
        except OSError as exc:  # a segment removed by --keep while it was read: the next poll reads the rest
            return error(503, f"the kept frames could not be read ({exc}); try again", headers={"Retry-After": "1"})
        return json_response(200, {"items": items, "labels": list(LABELS), "review_dir": str(review.dir)})
    kind = {"/api/review/original.png": "original", "/api/review/overlay.jpg": "overlay"}.get(req.path)
    if kind is None:
        return error(404, f"no such page: {req.path}")
    try:
        path = review.image(review.find((req.query.get("id") or [""])[0]), kind)
    except UserError as exc:
        return error(404, str(exc))
    if path is None:
        return error(404, f"the {kind} of that frame is gone (removed by --keep)")
    return Response(200, path.read_bytes(), "image/png" if kind == "original" else "image/jpeg", cache=True)


def post(routes, req: Request) -> Response:
    """Label one kept frame; a refusal (unknown id, a second label, another model's review folder) is a 409."""
    review = getattr(routes.service, "review", None)
    if review is None:
        return error(404, "this run has no results folder to review")
    try:
        body = json.loads(req.body or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict) or set(body) - FIELDS:
        return error(400, 'send a JSON object with id, label and optionally by, note, relabel: {"id": "...", '
                     '"label": "false_alarm", "by": "J. Doe"}')  # fmt: skip
    try:
        entry = review.label(
            body.get("id"), body.get("label"), body.get("by") or "live view", note=body.get("note"),
            relabel=body.get("relabel") is True, via="api",
        )  # fmt: skip
    except UserError as exc:
        return error(409, str(exc))
    routes.service.log(f"review: {entry['id']} labelled {entry['label']} by {entry['who']} from the live view")
    return json_response(200, {"review": entry})
