// SPDX-License-Identifier: LGPL-2.1-or-later
// See console.hpp.
#include "console.hpp"

#include <QBrush>
#include <QColor>
#include <QJsonDocument>
#include <QLocale>
#include <QNetworkReply>
#include <QNetworkRequest>

namespace otpgate::console {

QString human_bytes(double bytes) {
  return QLocale().formattedDataSize(qint64(bytes), 1);  // "423.1 KiB"
}

// ---------------------------------------------------------------------------
// ServicePoller

ServicePoller::ServicePoller(Kind kind, QUrl base, QObject* parent)
    : QObject(parent), kind_(kind), base_(std::move(base)) {
  connect(&network_, &QNetworkAccessManager::finished, this, &ServicePoller::finished);
  connect(&timer_, &QTimer::timeout, this, &ServicePoller::poll_now);
}

void ServicePoller::start(int interval_ms) {
  timer_.start(interval_ms);
  poll_now();
}

void ServicePoller::poll_now() {
  if (in_flight_) return;  // a slow service gets one request at a time
  QUrl url = base_;
  url.setPath(kind_ == Kind::gateway ? "/api/v1/status" : "/api/v1/jobs");
  QNetworkRequest request(url);
  request.setTransferTimeout(2000);
  request.setAttribute(QNetworkRequest::User, QStringLiteral("poll"));
  in_flight_ = true;
  network_.get(request);
}

void ServicePoller::finished(QNetworkReply* reply) {
  reply->deleteLater();
  if (reply->request().attribute(QNetworkRequest::User).toString() != "poll") return;
  in_flight_ = false;
  if (reply->error() != QNetworkReply::NoError) {
    set_up(false, reply->errorString());
    return;
  }
  QJsonParseError error{};
  const QJsonDocument doc = QJsonDocument::fromJson(reply->readAll(), &error);
  if (error.error != QJsonParseError::NoError || !doc.isObject()) {
    set_up(false, "the service answered something that is not a JSON object");
    return;
  }
  set_up(true, {});
  emit updated(doc.object());
}

void ServicePoller::set_up(bool up, const QString& error) {
  last_error_ = error;
  if (seen_ && up == up_) return;
  seen_ = true;
  up_ = up;
  emit availability_changed(up, error);
}

void ServicePoller::action_finished(QNetworkReply* reply,
                                    const std::function<void(int, QString)>& done) {
  reply->deleteLater();
  const int status = reply->attribute(QNetworkRequest::HttpStatusCodeAttribute).toInt();
  const QJsonObject body = QJsonDocument::fromJson(reply->readAll()).object();
  QString message = body.value("error").toString();
  if (status == 0) message = reply->errorString();
  if (done) done(status, message);
  poll_now();  // show the effect at once
}

void ServicePoller::post(const QString& path, const QJsonObject& body,
                         std::function<void(int, QString)> done) {
  QUrl url = base_;
  url.setPath(path);
  QNetworkRequest request(url);
  request.setHeader(QNetworkRequest::ContentTypeHeader, "application/json");
  request.setTransferTimeout(5000);
  QNetworkReply* reply = network_.post(request, QJsonDocument(body).toJson(QJsonDocument::Compact));
  connect(reply, &QNetworkReply::finished, this,
          [this, reply, done] { action_finished(reply, done); });
}

void ServicePoller::remove(const QString& path, std::function<void(int, QString)> done) {
  QUrl url = base_;
  url.setPath(path);
  QNetworkRequest request(url);
  request.setTransferTimeout(5000);
  QNetworkReply* reply = network_.deleteResource(request);
  connect(reply, &QNetworkReply::finished, this,
          [this, reply, done] { action_finished(reply, done); });
}

// ---------------------------------------------------------------------------
// Models

namespace {

QVariant header(const QStringList& names, int section, Qt::Orientation o, int role) {
  if (role != Qt::DisplayRole || o != Qt::Horizontal || section >= names.size()) return {};
  return names[section];
}

QString local_time(qint64 ms) {
  if (ms <= 0) return "-";
  return QDateTime::fromMSecsSinceEpoch(ms).toString("yyyy-MM-dd HH:mm");
}

}  // namespace

std::optional<KeySupplyRow> KeySupplyModel::make_row(const QString& site_name,
                                                     const QJsonObject& stream_object,
                                                     const char* dir) const {
  const QJsonObject k = stream_object.value("key_supply").toObject().value(dir).toObject();
  if (k.isEmpty()) return std::nullopt;
  const QJsonObject element = stream_object.value(dir).toObject();
  Row r;
  r.site = site_name;
  r.stream = stream_object.value("name").toString();
  r.direction = dir;
  r.ready_bytes = k.value("bytes_available").toDouble();
  r.seconds_left =
      k.value("seconds_to_exhaustion").isNull() ? -1 : k.value("seconds_to_exhaustion").toDouble();
  r.consumption_bps = k.value("consumption_bits_per_s").toDouble();
  r.fetched_bytes = k.value("bytes_fetched").toDouble();
  r.capacity_bytes = k.value("ring_capacity_bytes").toDouble();
  r.kme_healthy = k.value("kme_healthy").toBool(true);
  r.kme_error = k.value("kme_last_error").toString();
  r.mode = element.value("aes-fallback").toBool()                ? "AES fallback"
           : element.value("cipher").toString() == "aes-256-gcm" ? "AES"
                                                                 : "OTP";
  return r;
}

QVariant KeySupplyModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const Row& r = rows_.at(std::size_t(index.row()));
  if (role == Qt::UserRole + 1 && index.column() == ready) {  // the gauge's fill, 0..1
    return r.capacity_bytes > 0 ? QVariant(std::min(1.0, r.ready_bytes / r.capacity_bytes))
                                : QVariant();
  }
  if (role == Qt::UserRole) {  // raw numbers for tests and charts
    switch (index.column()) {
      case ready:
        return r.ready_bytes;
      case seconds_left:
        return r.seconds_left;
      case consumption:
        return r.consumption_bps;
      default:
        break;
    }
  }
  if (role == Qt::BackgroundRole) {
    const bool running_dry = r.direction == "send" && r.seconds_left >= 0 && r.seconds_left < 10;
    if (!r.kme_healthy || running_dry) return QBrush(QColor(255, 205, 205));
    if (r.mode != "OTP") return QBrush(QColor(255, 236, 179));
    return {};
  }
  if (role != Qt::DisplayRole) return {};
  if (index.column() <= direction) return key_cell(r, index.column());
  switch (index.column()) {
    case ready:
      return human_bytes(r.ready_bytes);
    case seconds_left:
      return r.seconds_left < 0 ? QString("idle") : QString("%1 s").arg(r.seconds_left, 0, 'f', 0);
    case consumption:
      return QString("%1 kbit/s").arg(r.consumption_bps / 1000, 0, 'f', 0);
    case kme:
      return r.kme_healthy ? "healthy" : "unreachable";
    case last_error:
      return r.kme_error;
    case mode:
      return r.mode;
    default:
      return {};
  }
}

QVariant KeySupplyModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Site",      "Stream",         "Direction",
                                 "Key ready", "Time left",      "Consumption",
                                 "KME",       "Last KME error", "Mode"};
  return header(names, section, o, role);
}

std::optional<StreamRow> StreamModel::make_row(const QString& site_name, const QJsonObject& o,
                                               const char* dir) const {
  const QJsonObject e = o.value(dir).toObject();
  if (e.isEmpty()) return std::nullopt;
  auto n = [&](const char* field) { return qulonglong(e.value(field).toDouble()); };
  Row r;
  r.site = site_name;
  r.stream = o.value("name").toString();
  r.direction = dir;
  r.packets = n("packets-out");
  r.bytes = n("bytes-out");
  r.auth_failures = n("auth-failures");
  r.replays = n("replays");
  r.drops = n("drops-no-key") + n("drops-malformed");
  return r;
}

QVariant StreamModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const Row& r = rows_.at(std::size_t(index.row()));
  const qulonglong values[] = {0, 0, 0, r.packets, r.bytes, r.auth_failures, r.replays, r.drops};
  if (role == Qt::BackgroundRole) {
    return index.column() >= auth_failures && values[index.column()] != 0
               ? QVariant(QBrush(QColor(255, 205, 205)))
               : QVariant();
  }
  if (role == Qt::UserRole && index.column() >= packets) return values[index.column()];
  if (role != Qt::DisplayRole) return {};
  if (index.column() <= direction) return key_cell(r, index.column());
  switch (index.column()) {
    case bytes:
      return human_bytes(double(r.bytes));
    default:
      return values[index.column()];
  }
}

QVariant StreamModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Site",  "Stream",        "Direction", "Packets",
                                 "Bytes", "Auth failures", "Replays",   "Drops"};
  return header(names, section, o, role);
}

void JobModel::update_site(const QString& service, const QJsonObject& document) {
  auto next = rows_;
  std::erase_if(next, [&](const auto& r) { return r.first == service; });
  for (const auto& j : document.value("jobs").toArray()) next.emplace_back(service, j.toObject());
  std::stable_sort(next.begin(), next.end(), [](const auto& a, const auto& b) {
    return a.second.value("created_at").toDouble() > b.second.value("created_at").toDouble();
  });
  auto id = [](const auto& r) { return r.first + r.second.value("job_id").toString(); };
  const bool same_rows = next.size() == rows_.size() &&
                         std::equal(next.begin(), next.end(), rows_.begin(),
                                    [&](const auto& a, const auto& b) { return id(a) == id(b); });
  if (same_rows) {  // keeps the operator's selection between polls
    rows_ = std::move(next);
    if (!rows_.empty()) emit dataChanged(index(0, 0), index(int(rows_.size()) - 1, count - 1));
    return;
  }
  beginResetModel();
  rows_ = std::move(next);
  endResetModel();
}

QVariant JobModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const QJsonObject& j = rows_.at(std::size_t(index.row())).second;
  const double size = j.value("transfer_size").toDouble();
  const double done = j.value("transferred").toDouble();
  const QString state = j.value("transfer_state").toString();
  if (role == Qt::BackgroundRole && index.column() == transfer_state) {
    if (state == "failed") return QBrush(QColor(255, 205, 205));
    if (state == "completed") return QBrush(QColor(205, 240, 205));
    return {};
  }
  if (role == Qt::UserRole) return j.value("job_id").toString();
  if (role == Qt::ToolTipRole) return j.value("error").toString();
  if (role != Qt::DisplayRole) return {};
  switch (index.column()) {
    case site:
      return rows_.at(std::size_t(index.row())).first;
    case specimen:
      return j.value("specimen_id").toString();
    case job:
      return j.value("job_id").toString();
    case folder:
      return j.value("folder").toString();
    case data_type:
      return j.value("data_type").toString();
    case created:
      return local_time(qint64(j.value("created_at").toDouble()));
    case analysis_state:
      return j.value("analysis_state").toString();
    case analysis_size:
      return human_bytes(j.value("analysis_size").toDouble());
    case analysis_time:
      return local_time(qint64(j.value("analysis_time").toDouble()));
    case transfer_state:
      return state;
    case transfer_size:
      return human_bytes(size);
    case completed:
      return local_time(qint64(j.value("completed_at").toDouble()));
    case method:
      return j.value("method").toString();
    case progress:
      return size > 0 ? QString("%1%").arg(100.0 * done / size, 0, 'f', 0) : QString("-");
    default:
      return {};
  }
}

QVariant JobModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Service",       "Specimen ID", "Job ID",        "Folder",
                                 "Data type",     "Created",     "Analysis",      "Analysis size",
                                 "Analysis time", "Transfer",    "Transfer size", "Completed",
                                 "Method",        "Progress"};
  return header(names, section, o, role);
}

// ---------------------------------------------------------------------------
// Alerts

void AlertLog::set(const QString& key, bool on, const QString& text) {
  bool& state = state_[key];
  if (on && !state) {
    const QString line = QDateTime::currentDateTime().toString("HH:mm:ss ") + text;
    insertRows(rowCount(), 1);
    setData(index(rowCount() - 1), line);
    emit raised(text);
  }
  state = on;
}

QStringList AlertLog::active() const {
  QStringList keys;
  for (const auto& [key, on] : state_)
    if (on) keys << key;
  return keys;
}

void AlertLog::check_gateway(const QString& service, const QJsonObject& status) {
  const QString site = status.value("site").toString();
  for (const auto& s : status.value("streams").toArray()) {
    const QJsonObject o = s.toObject();
    const QString stream = o.value("name").toString();
    for (const char* dir : {"send", "receive"}) {
      const QJsonObject k = o.value("key_supply").toObject().value(dir).toObject();
      if (k.isEmpty()) continue;
      const QString where = site + " " + stream + " " + dir;
      const double ready = k.value("bytes_available").toDouble();
      const double capacity = k.value("ring_capacity_bytes").toDouble();
      const double low_water = capacity > 0 ? capacity * thresholds_.low_water_fraction : 65536;
      const QJsonValue left = k.value("seconds_to_exhaustion");
      set("low:" + where, std::string_view(dir) == "send" && ready < low_water,
          where + ": key below the low-water mark (" + human_bytes(ready) + " ready)");
      set("exhaust:" + where,
          std::string_view(dir) == "send" && !left.isNull() &&
              left.toDouble() < thresholds_.exhaustion_minutes * 60,
          where +
              QString(": key predicted to run out in %1 min").arg(left.toDouble() / 60, 0, 'f', 1));
      set("kme:" + where, !k.value("kme_healthy").toBool(true),
          where + ": KME unreachable: " + k.value("kme_last_error").toString());
      const QJsonObject e = o.value(dir).toObject();
      const qulonglong failures = qulonglong(e.value("auth-failures").toDouble());
      qulonglong& seen = auth_failures_[service + where];
      set("auth:" + where + QString::number(failures), failures > seen,
          where + QString(": %1 authentication failures (tampering or a broken link?)")
                      .arg(failures - seen));
      seen = failures;
    }
  }
}

void AlertLog::check_jobs(const QString& service, const QJsonObject& jobs) {
  for (const auto& j : jobs.value("jobs").toArray()) {
    const QJsonObject o = j.toObject();
    const QString id = o.value("job_id").toString();
    set("job:" + service + id, o.value("transfer_state").toString() == "failed",
        "transfer " + id + " (specimen " + o.value("specimen_id").toString() +
            ") failed: " + o.value("error").toString());
  }
}

void AlertLog::service_availability(const QString& service, bool up, const QString& error) {
  set("down:" + service, !up, service + " is down: " + error);
}

}  // namespace otpgate::console
