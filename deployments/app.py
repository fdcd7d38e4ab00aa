"""The Ray Serve application: the ingress plus the Drafter, Verifier and Validator deployments.

``serve_config.yaml`` points at ``deployments.app:build_app``; its ``args:`` parse into
:class:`deployments.config.AppArgs` (unknown keys or wrong values fail the deploy).
"""

from .config import AppArgs
from .ingress import Ingress
from .replicas import DrafterDeployment, ValidatorDeployment, VerifierDeployment


def _model_deployments(a: AppArgs, suffix: str = ""):
    """One model's Drafter (and Verifier) deployments -> (drafter, ar) bound handles."""
    same = a.verifier.source == "same"
    verifier = None if same else VerifierDeployment.options(
        name="Verifier" + suffix, **a.verifier.replica.options()).bind(a.verifier, a.structured)
    remote = verifier if a.verify_mode() == "verifier" else None
    drafter = DrafterDeployment.options(name="Drafter" + suffix, **a.drafter.replica.options()).bind(
        a.drafter, a.verifier, a.structured, remote)
    return drafter, drafter if same else verifier


def build_app(args: dict | None = None):
    """Application builder for ``serve run``/``serve deploy`` (``import_path: deployments.app:build_app``).
    Each model (``model_name``, then ``models:``) gets its own Drafter (and Verifier) deployments,
    named ``Drafter`` for the default and ``Drafter-<name>`` for the others; one Validator (unless
    ``validator.placement`` is ``ingress``) and one Ingress serve them all."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    handles = {a.model_name: _model_deployments(a.model_args(0))}
    for i, m in enumerate(a.models):
        handles[m.name] = _model_deployments(a.model_args(i + 1), f"-{m.name}")
    validator = (ValidatorDeployment.options(**a.validator.replica.options()).bind(a.validator)
                 if a.validator.placement == "replica" else None)
    return Ingress.options(**a.ingress.options()).bind(a, handles, validator)
