"""A small byte-level BPE tokenizer trained in-process (offline, deterministic), for the tiny preset.

Specials: ``<pad> <s> </s> <unk> <image>``. Byte-level BPE means any text round-trips, even words
the training corpus never had.
"""

from __future__ import annotations

__all__ = ["SPECIAL_TOKENS", "build_tiny_tokenizer", "TINY_CORPUS"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# Text the tiny tokenizer learns its merges from: the template markers and the vocabulary of
# biomedical VQA questions and answers (including the synthetic set of `llavamed data synth`).
TINY_CORPUS = """
[INST] [/INST] ###Human: ###Assistant: Human Assistant
Is there a lesion in this image? Is there an abnormality? Is there a lesion? yes no Yes No Yes. No.
What is the modality of this image? What imaging modality was used? Where is the lesion located?
Which quadrant contains the lesion? upper left upper right lower left lower right center middle
The lesion is in the upper left. The lesion is in the lower right. There is no lesion.
fundus photograph retina retinal optic disc macula vessels microaneurysm microaneurysms
histology immunohistochemistry stain stained tissue section cells nuclei cell microscopy
CT scan computed tomography phantom slice axial MRI magnetic resonance chest x-ray X-ray radiograph
brain lung lungs heart liver kidney abdomen pelvis spine bone skull chest breast colon stomach
mass nodule tumor tumour cyst edema effusion fracture hemorrhage infarct opacity consolidation
pneumonia pneumothorax cardiomegaly atelectasis normal abnormal left right bilateral anterior posterior
Can you describe the image? Describe the image briefly. What does the image show? The image shows
a an the of in on with and or is are was were this that these those there here which what where how
bright dark round small large faint spot blob region area finding findings evidence patient figure
How many lesions are there? one two three four five zero none single multiple
What color is the spot? red green blue white black gray grey
""" * 4


def build_tiny_tokenizer(vocab_size: int = 640):
    """Train the tiny byte-level BPE tokenizer and wrap it as a fast transformers tokenizer.

    Args:
        vocab_size: target vocabulary size including specials and the 256 byte tokens.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos/eos/pad/unk set and ``<image>`` as an extra special.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=512, padding_side="left")
    return fast
