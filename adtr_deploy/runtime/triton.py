"""A backend that sends frames to a Triton Inference Server (HTTP/REST or gRPC, KServe v2 protocol) via tritonclient.

It has the Backend interface (`spec`, `run(batch) -> (maps, scores)`, `describe()`), so the runtime's pipeline and
post-processing treat a remote model exactly like a local one. The ModelSpec comes from the `adtr_spec` parameter of
the served model config (written by adtr-export --format triton) or from a local model.json. tritonclient is imported
only when this backend is built, never at runtime-package import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adtr_deploy.runtime.base import Backend, BackendError
from adtr_deploy.spec import METADATA_KEY, ModelSpec

PROTOCOLS = {"http": 8000, "grpc": 8001}  # Triton's default ports
NP_TO_TRITON = {np.dtype(np.uint8): "UINT8"}
CONFIG_TYPES = {"TYPE_UINT8": "UINT8", "TYPE_FP32": "FP32", "TYPE_FP16": "FP16"}


class TritonBackend(Backend):
    """A model served by Triton, opened by name: `TritonBackend("adtr", url="HOST:PORT")`, or through
    `open_model("adtr", backend="triton", url=...)` (the runtime calls every backend as `cls(model, device, **options)`).

    url: HOST[:PORT] (default port 8000 for http, 8001 for grpc). device: ignored; the server's instance groups decide.
    spec_path: a local model.json to use instead of the spec in the served config.
    timeout_s: bound on connecting and on each request, so a stalled server cannot hang the pipeline.
    binary: (http) send and receive tensors with the binary tensor extension rather than JSON lists.
    Any batch size is accepted: batches larger than the served max_batch_size go out as several requests.
    """

    name = "triton"
    local = False  # takes a served model's name, not a file

    def __init__(
        self,
        model: str | Path = "adtr",
        device: str = "cpu",
        *,
        url: str = "localhost:8000",
        protocol: str = "http",
        model_version: str = "",
        spec_path: str | Path | None = None,
        timeout_s: float = 30.0,
        binary: bool = True,
    ):
        protocol = protocol.lower()
        if protocol not in PROTOCOLS:
            raise BackendError(f"Triton protocol {protocol!r} is not supported; use http or grpc")
        self.protocol = protocol
        self.url = _normalize_url(url, PROTOCOLS[protocol])
        self.model_name = str(model)
        self.model_version = str(model_version)
        self.timeout_s = float(timeout_s)
        self.binary = binary
        self._client_mod, self.client = self._connect()
        try:
            self._check_ready()
            self.config = self._model_config()
            spec = ModelSpec.load(spec_path) if spec_path else _spec_from_config(self.config, self.url, self.model_name)
            super().__init__(Path(self.model_name), spec, device="remote")
            self.max_batch_size = int(self.config.get("max_batch_size", 0) or 0)
            self._check_io()
        except BaseException:
            self.close()  # a refused backend must not leave a connection pool behind
            raise

    # --- connection -------------------------------------------------------------------------------------------------
    def _connect(self):
        try:
            if self.protocol == "http":
                import tritonclient.http as mod
            else:
                import tritonclient.grpc as mod
        except (ImportError, RuntimeError):  # tritonclient raises RuntimeError when the protocol's extra is missing
            raise BackendError(
                f"the Triton backend needs tritonclient with {self.protocol} support; "
                "install it with pip install 'adtr-deploy[triton]'"
            ) from None
        try:
            if self.protocol == "http":
                client = mod.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            else:
                client = mod.InferenceServerClient(self.url)
        except Exception as exc:
            raise BackendError(
                f"cannot create a Triton {self.protocol} client for {self.url!r} ({_first_line(exc)})"
            ) from None
        return mod, client

    def _call(self, method: str, *args, **kwargs):
        """One client call with the request bound (grpc takes a per-call deadline; http's is set on the client)."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        return getattr(self.client, method)(*args, **kwargs)

    def _check_ready(self) -> None:
        try:
            live = self._call("is_server_live")
        except Exception as exc:
            raise BackendError(
                f"the Triton server at {self.url} ({self.protocol}) is not reachable ({_first_line(exc)}); "
                f"start it (see docs/triton.md) or fix --url/--protocol"
            ) from None
        if not live:
            raise BackendError(f"the Triton server at {self.url} answers but is not live; check the server log")
        try:
            ready = self._call("is_model_ready", self.model_name, self.model_version)
        except Exception as exc:
            raise BackendError(
                f"asking the Triton server at {self.url} whether model {self.model_name!r} is ready failed "
                f"({_first_line(exc)}); check the server log"
            ) from None
        if not ready:
            raise BackendError(
                f"model {self.model_name!r} is not ready on the Triton server at {self.url}; check --model and that "
                "the server loaded it from the repository adtr-export --format triton wrote (see the server log)"
            )

    def _model_config(self) -> dict:
        try:
            if self.protocol == "grpc":
                # as_json gives the same JSON form of ModelConfig that Triton serves over HTTP, inside {"config": ...}
                config = self._call("get_model_config", self.model_name, self.model_version, as_json=True)
                config = config.get("config", {})
            else:
                config = self._call("get_model_config", self.model_name, self.model_version)
        except Exception as exc:
            raise BackendError(
                f"reading the config of model {self.model_name!r} from {self.url} failed ({_first_line(exc)})"
            ) from None
        if not isinstance(config, dict):
            raise BackendError(f"the Triton server at {self.url} returned a model config that is not a JSON object")
        return config

    def _check_io(self) -> None:
        """The served config must have the spec's tensor names and types, or every request would fail later."""
        inputs = {t.get("name"): t for t in self.config.get("input", [])}
        outputs = {t.get("name"): t for t in self.config.get("output", [])}
        spec = self.spec
        if spec.input_name not in inputs or any(n not in outputs for n in spec.output_names):
            raise BackendError(
                f"model {self.model_name!r} on {self.url} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                f"but the spec says {spec.input_name!r} and {list(spec.output_names)}; the spec belongs to another model"
            )
        dtype = CONFIG_TYPES.get(inputs[spec.input_name].get("data_type", ""), "?")
        dims = [int(d) for d in inputs[spec.input_name].get("dims", [])]  # JSON int64s may arrive as strings
        h, w = spec.input_size
        if dtype != "UINT8" or dims != [h, w, 3] or self.max_batch_size < 1:
            raise BackendError(
                f"model {self.model_name!r} on {self.url} takes {dtype} {dims} with max_batch_size "
                f"{self.max_batch_size}; adtr models take batched UINT8 [{h}, {w}, 3]: re-export the repository"
            )
        self._output_types = {n: CONFIG_TYPES.get(outputs[n].get("data_type", ""), "?") for n in spec.output_names}

    # --- inference --------------------------------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Send the batch (in chunks of the served max_batch_size) and return (maps (N,1,H,W), scores (N,)) float32."""
        batch = self.check_batch(batch)
        maps, scores = [], []
        for start in range(0, len(batch), self.max_batch_size):
            amap, score = self._infer(batch[start : start + self.max_batch_size])
            maps.append(amap)
            scores.append(score)
        return np.concatenate(maps), np.concatenate(scores)

    def _infer(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mod = self._client_mod
        map_name, score_name = self.spec.output_names
        inp = mod.InferInput(self.spec.input_name, list(chunk.shape), NP_TO_TRITON[chunk.dtype])
        if self.protocol == "http":
            inp.set_data_from_numpy(chunk, binary_data=self.binary)
            outputs = [mod.InferRequestedOutput(n, binary_data=self.binary) for n in (map_name, score_name)]
            kwargs = {}
        else:
            inp.set_data_from_numpy(chunk)
            outputs = [mod.InferRequestedOutput(n) for n in (map_name, score_name)]
            kwargs = {"client_timeout": self.timeout_s}
        try:
            result = self.client.infer(
                self.model_name, [inp], model_version=self.model_version, outputs=outputs, **kwargs
            )
        except Exception as exc:
            raise BackendError(
                f"Triton inference of model {self.model_name!r} at {self.url} failed ({_first_line(exc)})"
            ) from None
        n = len(chunk)
        h, w = self.spec.input_size
        # The score is declared dims [1] (with reshape [] for the ONNX platform): the server returns (N, 1).
        amap = self._output(result, map_name, (n, 1, h, w))
        score = self._output(result, score_name, (n, 1))
        return self.as_outputs(amap, score)

    def _output(self, result, name: str, expected: tuple[int, ...]) -> np.ndarray:
        """One output tensor of an answer, or one sentence naming the server, the model and what is wrong with it."""
        where = f"the Triton server at {self.url} answered model {self.model_name!r}"
        try:
            out = result.as_numpy(name)
        except Exception as exc:  # tritonclient reshapes the raw bytes: an empty or short tensor fails right here
            raise BackendError(
                f"{where} with an unreadable {name!r} tensor ({_first_line(exc)}; expected shape {list(expected)}); "
                "an empty tensor from a Python-backend model usually means numpy>=2 in its environment (see the "
                "server log and docs/triton.md)"
            ) from None
        if out is None:
            raise BackendError(f"{where} without the {name!r} tensor it asked for (expected shape {list(expected)})")
        if out.size == 0 or tuple(out.shape) != expected:
            raise BackendError(
                f"{where} with {name!r} of shape {list(out.shape)} where {list(expected)} was expected"
                + (" (an empty tensor: see the server log)" if out.size == 0 else "")
            )
        if out.dtype not in (np.float32, np.float16):
            raise BackendError(f"{where} with {name!r} of type {out.dtype} where float32 was expected")
        return out

    def describe(self) -> dict:
        groups = [(g.get("kind", "?"), int(g.get("count", 1))) for g in self.config.get("instance_group", [])]
        return {
            "backend": self.name,
            "device": self.device,
            "model": self.model_name,
            "url": self.url,
            "protocol": self.protocol,
            "platform": self.config.get("platform") or self.config.get("backend", ""),
            "max_batch_size": self.max_batch_size,
            "instance_group": [f"{count}x {kind}" for kind, count in groups],
        }

    def close(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a client whose server went away must not mask the real outcome
                pass


def _spec_from_config(config: dict, url: str, model_name: str) -> ModelSpec:
    param = (config.get("parameters") or {}).get(METADATA_KEY)
    text = param.get("string_value") if isinstance(param, dict) else None
    if not text:
        raise BackendError(
            f"model {model_name!r} on {url} carries no {METADATA_KEY!r} parameter in its config; serve the repository "
            "adtr-export --format triton wrote, or pass the model's model.json with --spec"
        )
    return ModelSpec.from_json(text)


def _normalize_url(url: str, default_port: int) -> str:
    """tritonclient wants HOST:PORT without a scheme; accept http://HOST[:PORT] and add the protocol's default port."""
    url = url.strip().rstrip("/")
    for scheme in ("http://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    if not url or "/" in url:
        raise BackendError(f"Triton URL {url!r} must be HOST or HOST:PORT, e.g. localhost:8000")
    host, _, port = url.rpartition(":") if not url.endswith("]") else (url, "", "")
    if not host or not port.isdigit():  # no port given (or an IPv6 literal without one)
        return f"{url}:{default_port}"
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
