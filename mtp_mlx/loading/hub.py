"""Find a checkpoint folder: a local path, or a Hugging Face repo downloaded to the cache.

This is the only module in mtp_mlx that touches the network. It downloads only the files
a checkpoint needs (config, safetensors, tokenizer, chat template): never pickle weights
and never Python files, so no remote code can reach the machine.
"""

from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub import snapshot_download
from huggingface_hub.utils import validate_repo_id

from ..errors import MtpError

# Everything load() and convert() read; `tokenizer*` covers tokenizer.json, tokenizer.model
# and tokenizer_config.json, `*.jinja` the chat template.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "tokenizer*", "*.jinja", "*.txt"]


def resolve(path_or_repo: str, role: str = "model") -> Path:
    """Return the local folder of a checkpoint given as a folder or a Hub repo id.

    Args:
        path_or_repo (str): a local folder, or ``owner/name`` on the Hugging Face Hub.
        role (str): what the checkpoint is for (``"model"``, ``"drafter"``), used in
            error messages. Default: ``"model"``.

    Raises:
        MtpError: the path does not exist, is a file, or the download failed.
    """
    text = str(path_or_repo).strip()
    if not text:
        raise MtpError(f"{role} path is empty: pass a local folder or a Hugging Face repo id")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MtpError(
            f"{role} path {text!r} is a file, not a folder: pass the checkpoint folder "
            "(the one holding config.json) or a Hugging Face repo id"
        )
    if not _looks_like_repo_id(text):
        raise MtpError(
            f"{role} path {text!r} does not exist: pass a local folder or a Hugging Face "
            "repo id (owner/name)"
        )
    return _download(text, role)


def _looks_like_repo_id(text: str) -> bool:
    """``owner/name`` that the Hub would accept and that does not look like a file path."""
    if text.startswith((".", "/", "~", "\\")) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except hf_errors.HFValidationError:
        return False
    return True


def _download(repo_id: str, role: str) -> Path:
    # huggingface_hub draws its own tqdm progress bars and honours HF_HUB_OFFLINE itself:
    # offline, it returns the cached snapshot or raises LocalEntryNotFoundError.
    try:
        folder = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # every Hub failure becomes one readable line
        raise MtpError(_download_error(repo_id, role, err)) from err
    return Path(folder)


def _download_error(repo_id: str, role: str, err: Exception) -> str:
    chain = _exception_chain(err)
    if any(isinstance(e, hf_errors.GatedRepoError) for e in chain):
        return (
            f"{role} repo {repo_id!r} is gated on the Hugging Face Hub: accept its license "
            "on huggingface.co and log in with `hf auth login`, or pass a local folder"
        )
    if any(isinstance(e, hf_errors.RepositoryNotFoundError) for e in chain):
        return (
            f"{role} {repo_id!r} is neither a local folder nor a repo on the Hugging Face Hub "
            "(or the repo is private): check the path or repo id, or log in with `hf auth login`"
        )
    if any(isinstance(e, hf_errors.RevisionNotFoundError) for e in chain):
        return f"{role} repo {repo_id!r} has no such revision: check the repo id"
    if hf_constants.HF_HUB_OFFLINE:
        return (
            f"{role} repo {repo_id!r} is not in the local Hugging Face cache and "
            "HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it, or pass a local folder"
        )
    first_line = (str(err).strip().splitlines() or [""])[0][:160]
    return (
        f"could not download {role} {repo_id!r} from the Hugging Face Hub "
        f"({type(err).__name__}: {first_line}): check the repo id and your network, "
        "or pass a local folder"
    )


def _exception_chain(err: BaseException) -> list:
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen
