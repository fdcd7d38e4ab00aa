"""The Ray Serve application: the ingress plus the Drafter, Verifier and Validator deployments.

``serve_config.yaml`` points at ``deployments.app:build_app``; its ``args:`` parse into
:class:`deployments.config.AppArgs` (unknown keys or wrong values fail the deploy).
"""

from .config import AppArgs
from .ingress import Ingress
from .replicas import DrafterDeployment, ValidatorDeployment, VerifierDeployment


def build_app(args: dict | None = None):
    """Application builder for ``serve run``/``serve deploy`` (``import_path: deployments.app:build_app``)."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    same = a.verifier.source == "same"
    verifier = None if same else VerifierDeployment.options(**a.verifier.replica.options()).bind(a.verifier, a.structured)
    remote = verifier if a.verify_mode() == "verifier" else None
    drafter = DrafterDeployment.options(**a.drafter.replica.options()).bind(a.drafter, a.verifier, a.structured, remote)
    ar = drafter if same else verifier
    validator = ValidatorDeployment.options(**a.validator.replica.options()).bind(a.validator)
    return Ingress.options(**a.ingress.options()).bind(a, drafter, ar, validator)
