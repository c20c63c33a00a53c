"""Whole-section virtual tissue: a seamless canvas denoised jointly in windows (:mod:`.seamless`,
:mod:`.synthesis`) or one tile per spot (:mod:`.mosaic`), region edits (:mod:`.edits`), their
measurements (:mod:`.metrics`) and files (:mod:`.ometiff`, :mod:`.export`)."""
