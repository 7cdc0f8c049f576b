"""The official OpenAI Python SDK, unchanged except for base_url, against a real uvicorn."""

import io
import warnings

import av
import openai
import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning, module="openai")


def decode(data: bytes):
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height, stream.average_rate


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sdk_create_retrieve_download(live_server_factory):
    server = live_server_factory(api_keys="sk-test")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
    video = client.videos.create(prompt="a red circle moving left", seconds="2", size="64x64")
    assert video.status in ("queued", "in_progress") and video.id.startswith("video_")
    done = client.videos.create_and_poll(prompt="a blue square moving up", seconds="1", size="96x64")
    assert done.status == "completed" and done.progress == 100
    video = client.videos.poll(video.id)
    assert video.status == "completed" and video.size == "64x64" and video.seconds == "2"
    assert client.videos.retrieve(video.id).id == video.id

    content = client.videos.download_content(video.id)
    assert decode(content.read()) == (49, 64, 64, 24)
    assert decode(client.videos.download_content(done.id).read()) == (25, 96, 64, 24)

    listed = client.videos.list(limit=1)
    assert [v.id for v in listed.data] == [done.id] and listed.has_more
    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sdk_sees_errors_in_its_own_types(live_server_factory):
    server = live_server_factory(api_keys="sk-test")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).videos.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="x", size="720x1281")
    assert info.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="x", model="sora-2")
    assert info.value.body["code"] == "model_not_found"
