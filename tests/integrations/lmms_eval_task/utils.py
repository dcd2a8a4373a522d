"""The local V* task's functions: images through thyme's opener, the reference's question text,
thyme's VLMEvalKit option rule (so the task scores as ``thyme eval`` does)."""

from thyme.imageio import open_image
from thyme.scoring.rules import score_answer


def doc_to_visual(doc):
    # the same decoder and mode as thyme's hf backend: the model sees the same pixels
    return [open_image(doc["image"], mode="RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # VLMEvalKit's multiple-choice text without its last line (thyme_agent adds the instruction;
    # for the openai model, post_prompt adds it)
    text = f"Hint: {doc['hint']}\n" if doc.get("hint") else ""
    text += f"Question: {doc['question']}\nOptions:\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in doc["options"])
    return text.rstrip() + (lmms_eval_specific_kwargs or {}).get("post_prompt", "")


def process_results(doc, results):
    verdict = score_answer(results[0], doc["answer"], options=dict(doc["options"]), rule_set="vlmevalkit")
    return {"accuracy": float(bool(verdict and verdict.correct))}
