"""Training for ``resshift train``: the config (:mod:`.config`), data made on the fly (:mod:`.data`,
:mod:`.degradations`) and the loop with checkpoints and exact resumption (:mod:`.trainer`)."""
