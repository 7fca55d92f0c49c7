"""The error types that cross layers, and what each one means to a caller.

Every user-facing failure is a :class:`DmoeError` whose message says what is wrong and
what would be right. The HTTP server maps these *types* (never the text of a message)
to status codes in one table, ``dmoe.serve.errors.ERROR_STATUS``; the CLI turns any of
them into one readable line and exit code 2. Errors that belong to one module
(``ConfigError``, ``DatasetError``, ``BaseModelError``, ...) are defined there.
"""

from __future__ import annotations


class DmoeError(Exception):
    """A user-facing error: the message says what is wrong and what would be right."""


# ---------------------------------------------------------------- requests
class RequestError(DmoeError):
    """A request cannot be served as given (bad parameters, too long, malformed)."""


class UnknownExpertError(RequestError):
    """A request names an expert (or adapter id) that is not loaded."""


class QueueFull(RequestError):
    """More requests are waiting than the server's queue bound allows."""


class ShuttingDown(RequestError):
    """The server is draining: it takes no new requests."""


class Unauthorized(DmoeError):
    """A state-changing call without the server's API key."""


class CrossSiteError(DmoeError):
    """A state-changing call a browser sent from another site's page (CSRF)."""


class NotFoundError(RequestError):
    """A named thing (a dataset, a training run, a file to download) does not exist."""


class ConflictError(RequestError):
    """The request conflicts with what is going on (a run already training that expert)."""


# ---------------------------------------------------------------- experts on disk
class ExpertError(DmoeError):
    """An expert directory is missing, malformed, or made for another base."""


class ExpertNotFoundError(ExpertError):
    """No expert of that name exists under the configured roots."""


class OutsideRootsError(ExpertError):
    """A path lies outside every configured root (``..`` and symlinks resolved)."""


# ---------------------------------------------------------------- adapters in an engine
class AdapterError(DmoeError):
    """An adapter cannot be loaded into an engine; nothing was changed."""


class AdapterInUseError(AdapterError):
    """The adapter serves queued or running requests, so it cannot be replaced or unloaded now."""


class ExpertNotLoadedError(AdapterError):
    """An unload (or scale change) names an expert that is not resident in the engine."""


# ---------------------------------------------------------------- engines
class TrainError(DmoeError):
    """Training cannot start or continue as configured."""


class EngineError(DmoeError):
    """The engine itself failed (a backend refused a batch, a step loop did not finish)."""


# ---------------------------------------------------------------- cluster
class ClusterError(DmoeError):
    """The cluster could not serve a request: every replica and fallback failed, or Ray is unreachable."""


class ExpertFetchError(ClusterError):
    """A replica could not fetch an expert's files from Ray's object store."""
