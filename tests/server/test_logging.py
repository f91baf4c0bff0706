"""Debug records that no handler would show are not built (Jupyter keeps its loggers at DEBUG)."""

import logging

from sage_nb.server.app import drop_unseen_records


def _logger(name: str, *handler_levels: int, parent: logging.Logger | None = None) -> logging.Logger:
    logger = logging.Logger(name, logging.DEBUG)
    for level in handler_levels:
        handler = logging.NullHandler()
        handler.setLevel(level)
        logger.addHandler(handler)
    if parent is not None:
        logger.parent = parent
    return logger


def test_level_rises_to_the_lowest_handler_level():
    logger = _logger("a", logging.INFO, logging.WARNING)
    drop_unseen_records(logger)
    assert not logger.isEnabledFor(logging.DEBUG) and logger.isEnabledFor(logging.INFO)


def test_debug_stays_when_a_handler_shows_it():
    logger = _logger("b", logging.INFO, logging.DEBUG)  # e.g. jupyter server --debug
    drop_unseen_records(logger)
    assert logger.isEnabledFor(logging.DEBUG)
    child = _logger("c", logging.WARNING, parent=_logger("p", logging.NOTSET))  # a propagating parent
    drop_unseen_records(child)
    assert child.isEnabledFor(logging.DEBUG)


def test_a_logger_with_no_handlers_is_left_alone():
    logger = _logger("d")
    logger.propagate = False
    drop_unseen_records(logger)
    assert logger.level == logging.DEBUG
