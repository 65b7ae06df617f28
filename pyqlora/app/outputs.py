"""Output folders of the command line: refuse to overwrite, and write atomically.

Every command that writes a folder (``finetune --output``, ``quantize OUT``) checks it
before any work with :func:`check_output_folder` (a folder with files in it is refused
unless ``--overwrite``) and writes it with :func:`publish` (everything goes into a
temporary folder beside it first and is moved in only once it is complete), so an error
or an interruption never leaves a half-written output, and a finished run is never
replaced by surprise. :func:`replace_folder` writes a whole folder that replaces any
earlier one of that name (a training checkpoint).
"""
import os
import shutil

__all__ = ["check_output_folder", "publish", "replace_folder"]


def _temporary_beside(out, tag):
    """A new empty folder ``.NAME.TAGpid`` beside `out` (its parent is created if missing)."""
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(out)}.{tag}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
    except OSError as exc:
        raise type(exc)(f"cannot write beside {out}: {exc.strerror or exc}") from exc
    return tmp


def check_output_folder(path, option, overwrite=False, ignore=lambda name: False):
    """Raise now (OSError, before any work) when `path` cannot be the output folder of a run.

    A file in the way is refused (NotADirectoryError); a folder with entries in it is refused
    (FileExistsError) unless `overwrite`, with the first entries named. ``ignore(name)`` says
    which entries do not count (a resumed run's own checkpoints). A missing folder is fine:
    it is created at the end.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{option} {path} is a file; give a folder (it is created if missing)")
    if overwrite or not os.path.isdir(path):
        return
    try:
        entries = sorted(e for e in os.listdir(path) if not ignore(e))
    except OSError as exc:
        raise type(exc)(f"{option} {path}: cannot list the folder: {exc.strerror or exc}") from exc
    if entries:
        shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
        raise FileExistsError(f"{option} {path} is not empty ({shown}); give a new or empty folder, or "
                              "--overwrite to replace the files this run writes")


def publish(out, write):
    """Call ``write(folder)`` on a new temporary folder beside `out`, then move what it wrote into `out`.

    Nothing in `out` changes unless `write` returns: an error (or an interruption) leaves no
    half-written file there. `out` is created if missing (renamed from the temporary folder);
    entries already in it that `write` does not write stay, those it writes are replaced
    (a sub-folder as a whole).
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out} is a file; the output must be a folder")
    tmp = _temporary_beside(out, "tmp")
    try:
        write(tmp)
        if not os.path.exists(out):
            os.replace(tmp, out)
        else:
            for name in sorted(os.listdir(tmp)):
                dest = os.path.join(out, name)
                if os.path.isdir(dest) and not os.path.islink(dest):
                    shutil.rmtree(dest)
                os.replace(os.path.join(tmp, name), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_folder(out, write):
    """Write the folder `out` whole: ``write(folder)`` fills a temporary folder that is then renamed to `out`.

    An earlier `out` is replaced only once the new one is complete (it is renamed aside, the new
    one renamed in, the old one removed), so at every moment `out` is absent, old or new and
    whole, never half written.
    """
    out = os.path.abspath(out)
    tmp = _temporary_beside(out, "tmp")
    old = None
    try:
        write(tmp)
        if os.path.isdir(out):
            old = _temporary_beside(out, "old")
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
