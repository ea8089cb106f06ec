"""One module per ``unclip train STAGE``: each builds its model, data and loss and hands them
to the one training loop (:class:`unclip.train.Trainer`)."""
