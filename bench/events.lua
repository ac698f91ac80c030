-- wrk script: Eventarc-style binary CloudEvents, every request a distinct Cloud Storage change.
--
--   wrk -t2 -c80 -d10s --latency -s bench/events.lua http://127.0.0.1:PORT -- PREFIX
--
-- PREFIX is 8 decimal digits, new for every wrk run (bench/run.py draws it at random), so no two
-- requests of a run, nor of two runs against one server, share a generation: the service's
-- deduplication (type + bucket + name + generation + metageneration) never short-circuits.
-- Generation = PREFIX .. thread number (1 digit) .. per-thread counter (10 digits): 19 digits,
-- below 2^63, sent as a decimal string as Cloud Storage does (proto3 JSON for int64).
--
-- Headers and body follow what Eventarc delivers to Cloud Run (see tests/factories.py and
-- Google's StorageObjectData samples).

local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

local prefix
local counter = 0
local bucket = "bench-uploads"
local path = "/?__GCP_CloudEventsMode=GCS_NOTIFICATION"

function init(args)
   prefix = args[1]
   if prefix == nil or not prefix:match("^[1-8]%d%d%d%d%d%d%d$") then
      error("events.lua needs an 8-digit prefix (first digit 1-8): wrk ... -- 12345678")
   end
   if id > 9 then
      error("events.lua supports at most 10 wrk threads")
   end
end

local body_template = table.concat({
   '{"bucket":"', bucket, '",',
   '"contentType":"text/csv",',
   '"crc32c":"rTVTeQ==",',
   '"etag":"CNHZkbuF/ugCEAE=",',
   '"generation":"%s",',
   '"id":"', bucket, '/%s/%s",',
   '"kind":"storage#object",',
   '"md5Hash":"kF8MuJ5+CTJxvyhHS1xzRg==",',
   '"mediaLink":"https://storage.googleapis.com/download/storage/v1/b/', bucket,
   '/o/%s?generation=%s&alt=media",',
   '"metageneration":"1",',
   '"name":"%s",',
   '"selfLink":"https://www.googleapis.com/storage/v1/b/', bucket, '/o/%s",',
   '"size":"48213",',
   '"storageClass":"STANDARD",',
   '"timeCreated":"2024-05-14T09:21:07.482Z",',
   '"timeStorageClassUpdated":"2024-05-14T09:21:07.482Z",',
   '"updated":"2024-05-14T09:21:07.482Z"}',
})

function request()
   counter = counter + 1
   local generation = string.format("%s%d%010d", prefix, id, counter)
   local name = string.format("reports/%d/day-%d.csv", id, counter)
   local escaped = name:gsub("/", "%%2F")
   local body = string.format(
      body_template, generation, name, generation, escaped, generation, name, escaped
   )
   local headers = {
      ["ce-id"] = generation,
      ["ce-source"] = "//storage.googleapis.com/projects/_/buckets/" .. bucket,
      ["ce-specversion"] = "1.0",
      ["ce-type"] = "google.cloud.storage.object.v1.finalized",
      ["ce-subject"] = "objects/" .. name,
      ["ce-time"] = "2024-05-14T09:21:07.482Z",
      ["ce-bucket"] = bucket,
      ["Content-Type"] = "application/json",
   }
   return wrk.format("POST", path, headers, body)
end
