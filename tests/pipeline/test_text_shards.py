"""Text shards (`fip shard text`): JSONL records tokenised into WebDataset shards, local and on S3, read back
as a causal LM's (x, y) rows, split exactly across ranks, resumed after an interruption, D_val taken while
streaming, and each bad input refused in one line."""

import dataclasses
import hashlib
import io
import json
import tarfile

import pytest
import torch
from text_corpus import WORDS, make_records, make_tokenizer, write_jsonl
from tokenizers import Tokenizer

from fip.tasks import IGNORE
from pipeline.shard_sources import DvalSplit
from pipeline.shard_writer import write_source, write_warnings
from pipeline.shardfmt import PARTIAL_MANIFEST, ShardError, ShardManifest, add_text_sample
from pipeline.shards import RankStream, open_shards, rank_loader, rank_range, read_all
from pipeline.text_source import TextSourceError, jsonl_source

MAX_LENGTH = 16


@pytest.fixture
def corpus(tmp_path):
    records = make_records()
    return write_jsonl(tmp_path / "data.jsonl", records), make_tokenizer(tmp_path / "tok"), records


def expected_rows(tok_folder, record, max_length=MAX_LENGTH):
    """The contract, written out independently of the reader."""
    tok = Tokenizer.from_file(str(tok_folder / "tokenizer.json"))
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("<eos>")
    prompt, scored = tok.encode(record["prompt"]).ids, tok.encode(record["response"]).ids + [eos]
    prompt = prompt[-(max_length - len(scored)):] if len(prompt) + len(scored) > max_length else prompt
    seq = prompt + scored
    x = seq + [pad] * (max_length - len(seq))
    y = [IGNORE] * len(prompt) + scored + [IGNORE] * (max_length - len(seq))
    return torch.tensor(x), torch.tensor(y)


def test_rows_follow_the_causal_lm_contract_and_the_manifest_names_the_tokenizer(corpus, tmp_path):
    data, tok, records = corpus
    result = write_source(jsonl_source(data, tok, MAX_LENGTH), str(tmp_path / "out"), maxcount=7)
    m = result.manifests[str(tmp_path / "out")]
    assert m.task == "causal-lm" and m.max_length == MAX_LENGTH and m.count == 50 and len(m.shards) == 8
    tokenizer = m.tokenizer
    assert (tokenizer.name, tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.vocab_size) == \
           ("tok", 0, 2, None, 3 + len(WORDS))
    x, y, idx = read_all(open_shards(str(tmp_path / "out"), tokenizer=str(tok)))
    assert x.shape == y.shape == (50, MAX_LENGTH) and x.dtype == y.dtype == torch.int64
    assert idx.tolist() == list(range(50))
    for i, record in enumerate(records):
        want_x, want_y = expected_rows(tok, record)
        assert torch.equal(x[i], want_x) and torch.equal(y[i], want_y), i
    assert any(len(r["prompt"].split()) + len(r["response"].split()) + 1 > MAX_LENGTH for r in records)  # cut ones
    assert y[3, 0] != IGNORE  # no prompt: the response starts the sequence
    # a sample in the tar is plain JSON token ids beside its index
    with tarfile.open(tmp_path / "out" / "000000.tar") as tar:
        names = tar.getnames()
        body = json.loads(tar.extractfile(names[0]).read())
    assert names[:2] == ["000000000.json", "000000000.idx"] and set(body) == {"prompt", "response"}
    # an image manifest of before (no task field) still loads, as classification
    old = json.loads(m.to_json())
    for k in ("task", "tokenizer", "max_length"):
        del old[k]
    old.update(classes=["a", "b"], image_shape=[1, 8, 8])
    assert ShardManifest.from_json(json.dumps(old), "old").task == "classification"


def test_rank_split_is_exact_over_three_ranks(corpus, tmp_path):
    data, tok, _ = corpus
    write_source(jsonl_source(data, tok, MAX_LENGTH), str(tmp_path / "out"), maxcount=9)
    source = open_shards(str(tmp_path / "out"))
    x_all, y_all, _ = read_all(source)
    xs, ys, batches = [], [], []
    for rank in range(3):
        got = list(rank_loader(RankStream(source, rank, 3), batch_size=4))
        batches.append(len(got))
        for xb, yb, pad in got:
            assert xb.shape[1:] == yb.shape[1:] == (MAX_LENGTH,) and xb.dtype == torch.int64
            xs.append(xb[~pad])
            ys.append(yb[~pad])
    assert len(set(batches)) == 1  # every rank the same number of batches
    assert torch.equal(torch.cat(xs), x_all) and torch.equal(torch.cat(ys), y_all)  # each sample once, in order
    # DataLoader worker processes split a rank's range again: the same rows
    two = list(rank_loader(RankStream(source, 2, 3), batch_size=4, num_workers=2))
    rows = sorted(tuple(r.tolist()) for b in two for r in torch.cat([b[0], b[1]], 1)[~b[2]])
    want = torch.cat([x_all, y_all], 1)[rank_range(50, 2, 3)[0]:]
    assert rows == sorted(tuple(r.tolist()) for r in want)  # the workers interleave their batches


def test_a_bpe_tokenizer_with_a_bos_template_and_no_config(tmp_path):
    """A Llama-style tokenizer: the prompt gets its BOS, the response none, a cut prompt keeps its BOS; eos found by
    name, padding = eos."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    sentences = [f"{r['prompt']} {r['response']}" for r in make_records(200, seed=1)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>", "<unk>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    (tmp_path / "llama").mkdir()
    tok.save(str(tmp_path / "llama" / "tokenizer.json"))
    records = [{"prompt": "what did the cat do", "response": " the cat sat"}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    prompt = tok.encode(records[0]["prompt"]).ids
    response = tok.encode(records[0]["response"], add_special_tokens=False).ids
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    assert prompt[0] == bos and bos not in response
    short = len(response) + 1 + 3  # room for the BOS and the prompt's last two tokens
    for length, kept in ((64, prompt), (short, [bos, *prompt[-2:]])):
        out = tmp_path / f"out{length}"
        m = write_source(jsonl_source(data, tmp_path / "llama", length), str(out), maxcount=8).manifests[str(out)]
        assert (m.tokenizer.eos_id, m.tokenizer.pad_id, m.tokenizer.bos_id) == (eos, eos, bos)
        x, y, _ = read_all(open_shards(str(out)))
        seq = kept + response + [eos]
        assert x[0].tolist() == seq + [eos] * (length - len(seq))
        assert y[0].tolist() == [IGNORE] * len(kept) + response + [eos] + [IGNORE] * (length - len(seq))


def test_interrupted_write_resumes_and_the_digest_covers_the_text(corpus, tmp_path):
    data, tok, records = corpus
    source = jsonl_source(data, tok, MAX_LENGTH)

    def dying():
        """The source's records, dying after the first 25 (as a lost disk or a kill would)."""
        for group, samples in source.groups():
            yield group, samples[:25]
            raise RuntimeError("source lost")

    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="source lost"):
        write_source(dataclasses.replace(source, groups=dying), str(dest), maxcount=7, save_every=0)
    assert not (dest / "manifest.json").exists() and (dest / PARTIAL_MANIFEST).exists()
    resumed = write_source(jsonl_source(data, tok, MAX_LENGTH), str(dest), maxcount=7)
    assert (resumed.stats.shards_reused, resumed.stats.shards_written) == (3, 5)
    fresh = write_source(jsonl_source(data, tok, MAX_LENGTH), str(tmp_path / "fresh"), maxcount=7)
    assert [s.sha256 for s in resumed.manifests[str(dest)].shards] == \
           [s.sha256 for s in fresh.manifests[str(tmp_path / "fresh")].shards]
    # one record's text changed: only its shard is written again
    records[30]["response"] = "blue sky"
    write_jsonl(data, records)
    again = write_source(jsonl_source(data, tok, MAX_LENGTH), str(dest), maxcount=7)
    assert (again.stats.shards_reused, again.stats.shards_written) == (7, 1)
    # another max_length is another write
    with pytest.raises(ShardError, match="already holds shards of another write"):
        write_source(jsonl_source(data, tok, 32), str(dest), maxcount=7)


def test_dval_share_is_seeded_and_s3_round_trips(corpus, s3_store):
    data, tok, _ = corpus
    dest, rest = "s3://fip-test/text/dval", "s3://fip-test/text/rest"

    def write(seed, workers=2):
        return write_source(jsonl_source(data, tok, MAX_LENGTH), dest, maxcount=8, workers=workers, store=s3_store,
                            dval=DvalSplit(0.2, seed), rest=rest, overwrite=True)

    r = write(0)
    assert r.manifests[dest].count == 10 and r.manifests[rest].count == 40
    _, _, dval_idx = read_all(open_shards(dest, s3_store, tokenizer=str(tok)))
    x, y, rest_idx = read_all(open_shards(rest, s3_store))
    assert sorted(dval_idx.tolist() + rest_idx.tolist()) == list(range(50))
    assert x.shape == (40, MAX_LENGTH) and (y != IGNORE).any(1).all()
    assert write(0).stats.shards_reused == 2 + 5  # a rerun writes nothing
    write(1, workers=1)
    assert read_all(open_shards(dest, s3_store))[2].tolist() != dval_idx.tolist()  # another seed, another D_val


def test_bad_sources_and_tokenizers_fail_in_one_line(corpus, tmp_path):
    data, tok, records = corpus
    lines = [json.dumps(r) for r in records[:4]]

    def refused(text, match, name="bad.jsonl"):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(TextSourceError, match=match) as e:
            write_source(jsonl_source(path, tok, MAX_LENGTH), str(tmp_path / "never"), maxcount=7)
        assert "\n" not in str(e.value)

    refused("\n".join(lines[:2] + ["{not json"] + lines[2:]), r"bad\.jsonl:3: not JSON")
    refused("\n".join(lines[:1] + [json.dumps({"prompt": "the cat"})]), r'bad\.jsonl:2: a record needs string fields '
                                                                      r'"prompt" and "response"; response is missing')
    refused(json.dumps(["the", "cat"]), r"bad\.jsonl:1: a record must be a JSON object")
    with pytest.raises(TextSourceError, match=r"is empty: no records"):
        jsonl_source(write_jsonl(tmp_path / "empty.jsonl", []), tok)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(TextSourceError, match="holds no .jsonl files"):
        jsonl_source(tmp_path / "nothing", tok)
    (tmp_path / "no-tok").mkdir()
    with pytest.raises(TextSourceError, match="has no tokenizer.json"):
        jsonl_source(data, tmp_path / "no-tok")
    bare = make_tokenizer(tmp_path / "bare", words=["the", "cat"], config=False, specials=["<unk>"])
    with pytest.raises(TextSourceError, match="names no end-of-sequence token"):
        jsonl_source(data, bare)
    # the wrong tokenizer at read time
    write_source(jsonl_source(data, tok, MAX_LENGTH), str(tmp_path / "out"), maxcount=20)
    other = make_tokenizer(tmp_path / "other", words=[*WORDS, "green"])
    with pytest.raises(ShardError, match=r"tokenizer .*other is not the one .* was written with"):
        open_shards(str(tmp_path / "out"), tokenizer=str(other))


def test_bad_shards_are_named_and_can_be_skipped(corpus, tmp_path):
    data, tok, records = corpus
    out = tmp_path / "out"
    write_source(jsonl_source(data, tok, MAX_LENGTH), str(out), maxcount=20)
    # a token id outside the vocabulary (a shard made by another tool): named, or skipped and counted
    manifest = json.loads((out / "manifest.json").read_text())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add_text_sample(tar, "a", [3, 4], [5], 0)
        add_text_sample(tar, "b", [3, 999], [5], 1)
    (out / "000002.tar").write_bytes(buf.getvalue())
    manifest["shards"][2].update(count=2, sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    manifest["count"] = 42
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"000002.tar: sample 'b' has token id 999, outside the tokenizer's vocabulary"):
        read_all(open_shards(str(out)))
    stream = RankStream(open_shards(str(out)), 0, 1, skip_corrupt=True)
    pads = sum(int(p.sum()) for _, _, p in rank_loader(stream, 8))
    assert stream.skipped(pads) == 1
    # bytes changed since the write (in a member's block padding, so the tar still reads): the SHA-256 check
    shard0 = (out / "000000.tar").read_bytes()
    at = shard0.index(b"]}") + 2
    assert shard0[at] == 0
    (out / "000000.tar").write_bytes(shard0[:at] + b"\x01" + shard0[at + 1:])
    with pytest.raises(ShardError, match=r"000000.tar does not match its manifest: SHA-256"):
        read_all(open_shards(str(out)))
    (out / "000000.tar").write_bytes(shard0)
    # a truncated shard, as for images
    (out / "000001.tar").write_bytes((out / "000001.tar").read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"000001.tar is (corrupt or )?truncated"):
        read_all(open_shards(str(out)))
    # a shard the manifest counts as empty
    empty = json.loads(json.dumps(manifest))
    empty["count"] -= empty["shards"][1]["count"]
    empty["shards"][1]["count"] = 0
    (out / "manifest.json").write_text(json.dumps(empty))
    with pytest.raises(ShardError, match=r"000001.tar is empty \(0 samples in the manifest\)"):
        open_shards(str(out))
    # a text manifest without its tokenizer
    manifest["tokenizer"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="must name its tokenizer"):
        open_shards(str(out))


def test_records_too_long_are_left_out_and_listed(corpus, tmp_path):
    data, tok, records = corpus
    records[5]["response"] = " ".join(["cat"] * MAX_LENGTH)
    write_jsonl(data, records)
    r = write_source(jsonl_source(data, tok, MAX_LENGTH), str(tmp_path / "out"), maxcount=20)
    m = r.manifests[str(tmp_path / "out")]
    assert m.count == 49 and m.meta["skipped"] == 1
    assert r.stats.skipped == [{"index": 5, "path": "data.jsonl:6",
                                "reason": f"its response of {MAX_LENGTH} tokens and the eos do not fit max_length 16"}]
    assert "data.jsonl:6" in write_warnings(r.stats, "records")[0]
    assert 5 not in read_all(open_shards(str(tmp_path / "out")))[2].tolist()


def test_fip_shard_text_command(corpus, tmp_path, capsys):
    from fipcli.main import main

    data, tok, _ = corpus
    args = ["shard", "text", str(data), str(tmp_path / "dval"), "--tokenizer", str(tok), "--max-length", "16",
            "--maxcount", "8", "--workers", "1", "--dval-fraction", "0.2", "--rest", str(tmp_path / "rest")]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out[str(tmp_path / "dval")]["count"] == 10 and out[str(tmp_path / "rest")]["count"] == 40
    assert open_shards(str(tmp_path / "rest")).manifest.max_length == 16
    assert main(args) == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_reused"] == 2 + 5
    assert main(["shard", "text", str(data), str(tmp_path / "x")]) == 2
    assert "needs --tokenizer FOLDER" in capsys.readouterr().err
    assert main(["shard", "text", str(tmp_path / "x"), "--tokenizer", str(tok)]) == 2
    assert "takes a JSONL file or folder and a destination" in capsys.readouterr().err
    assert main(["shard", "digits", str(tmp_path / "y"), "--tokenizer", str(tok)]) == 2
    assert "are for fip shard text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    assert "fip shard text JSONL DEST --tokenizer FOLDER" in capsys.readouterr().out
